// A real OpenID provider for the single sign-on tests: the certified `oidc-provider` package
// over HTTPS on loopback, with one confidential client (the control plane under test), an
// account store that knows whoever signs in, and a one-field login page as its user interface.
//
// Environment: PORT, CERT and KEY (PEM files), CLIENT_ID, CLIENT_SECRET, REDIRECT_URI.
// The login name is the email; names starting with `unverified` get `email_verified: false`;
// `groups` lists the part of the name before `+` (`admins+ann@example.com` is in `admins`).
//
// The tests attack the control plane through this provider as a compromised or malicious
// provider would: `POST /_test/tamper` with a mode changes the next token response's ID token
// (`audience`, `expired`: claims changed, re-signed with the provider's own key; `forged`: the
// same claims signed with a foreign key under the provider's key id; `replay`: the ID token of
// the previous sign-in instead). `POST /_test/rotate` rotates the signing key: a new key is
// published in the JWKS and signs every ID token from then on.
import fs from 'node:fs';
import https from 'node:https';

import * as jose from 'jose';
import Provider from 'oidc-provider';

const { PORT, CERT, KEY, CLIENT_ID, CLIENT_SECRET, REDIRECT_URI } = process.env;
const issuer = `https://127.0.0.1:${PORT}`;

async function signingKey(kid) {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  return { kid, privateKey, jwk: { ...(await jose.exportJWK(privateKey)), kid, alg: 'RS256', use: 'sig' } };
}

const original = await signingKey('original');
const foreign = await signingKey('original');
let rotated = null;
let tamper = null;
let previousIdToken = null;

const publicJwk = ({ kty, n, e, kid, alg, use }) => ({ kty, n, e, kid, alg, use });

const provider = new Provider(issuer, {
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    redirect_uris: [REDIRECT_URI],
    response_types: ['code'],
    grant_types: ['authorization_code'],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  jwks: { keys: [original.jwk] },
  pkce: { required: () => true, methods: ['S256'] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], groups: ['groups'] },
  // The claims of the granted scopes go into the ID token itself, as Keycloak, Okta and
  // Google do: the control plane reads only the ID token.
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  cookies: { keys: ['sensei-test-provider-cookie-key'] },
  async findAccount(ctx, id) {
    const group = id.includes('+') ? [id.split('+')[0]] : [];
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: id, email_verified: !id.startsWith('unverified'), groups: group };
      },
    };
  },
});
provider.proxy = false;

async function resign(token, mode) {
  const payload = jose.decodeJwt(token);
  const now = Math.floor(Date.now() / 1000);
  const sign = (claims, key) => new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid: key.kid, typ: 'JWT' })
    .sign(key.privateKey);
  switch (mode) {
    case 'audience': return sign({ ...payload, aud: 'some-other-client' }, original);
    case 'expired': return sign({ ...payload, iat: now - 7200, exp: now - 3600 }, original);
    case 'forged': return sign(payload, foreign);
    case 'replay': return previousIdToken;
    default: return token;
  }
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/jwks' && rotated) {
    ctx.body = { keys: [publicJwk(original.jwk), publicJwk(rotated.jwk)] };
    return;
  }
  await next();
  if (ctx.path === '/token' && ctx.status === 200 && ctx.body && ctx.body.id_token) {
    const issued = ctx.body.id_token;
    let token = issued;
    if (rotated) {
      const payload = jose.decodeJwt(issued);
      token = await new jose.SignJWT(payload)
        .setProtectedHeader({ alg: 'RS256', kid: rotated.kid, typ: 'JWT' })
        .sign(rotated.privateKey);
    }
    if (tamper) {
      token = await resign(token, tamper);
      tamper = null;
    }
    previousIdToken = issued;
    ctx.body = { ...ctx.body, id_token: token };
  }
});

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 4096) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

const providerCallback = provider.callback();

const server = https.createServer({ cert: fs.readFileSync(CERT), key: fs.readFileSync(KEY) }, async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    if (req.method === 'POST' && url.pathname === '/_test/tamper') {
      tamper = (await readForm(req)).get('mode');
      res.writeHead(204).end();
      return;
    }
    if (req.method === 'POST' && url.pathname === '/_test/rotate') {
      rotated = await signingKey(`rotated-${Date.now()}`);
      res.writeHead(204).end();
      return;
    }
    if (url.pathname.startsWith('/interaction/')) {
      const details = await provider.interactionDetails(req, res);
      if (req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(`<!doctype html><title>Test provider</title><h1>Test identity provider</h1>
<form method="post" action="/interaction/${escape(details.uid)}">
<label for="login">Email</label><input id="login" name="login" autofocus>
<button type="submit" id="provider-sign-in">Sign in</button></form>`);
        return;
      }
      const login = (await readForm(req)).get('login');
      const grant = new provider.Grant({ accountId: login, clientId: details.params.client_id });
      grant.addOIDCScope(details.params.scope);
      const grantId = await grant.save();
      await provider.interactionFinished(req, res, {
        login: { accountId: login },
        consent: { grantId },
      }, { mergeWithLastSubmission: false });
      return;
    }
    providerCallback(req, res);
  } catch (error) {
    res.writeHead(500, { 'content-type': 'text/plain' }).end(String(error));
  }
});

server.listen(Number(PORT), '127.0.0.1', () => {
  process.stdout.write(`listening ${issuer}\n`);
});
