// The dashboard's only script. Pages work without it, except security keys, which only a
// script can reach (navigator.credentials); with it, a running deployment's log and a
// rollout's progress follow the API's server-sent events. It only ever sets text
// (textContent), never markup, so nothing the server streams can become HTML.
"use strict";

(function () {
  function followLog(log) {
    var url = log.getAttribute("data-follow");
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var status = document.getElementById("deployment-status");
    var source = new EventSource(url);
    source.addEventListener("line", function (event) {
      var entry;
      try {
        entry = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      // A reconnect resumes after the last id the browser saw; never show a line twice.
      if (log.querySelector('[data-id="' + Number(entry.id) + '"]')) {
        return;
      }
      var span = document.createElement("span");
      span.className = "line " + (entry.stream === "stderr" ? "stderr" : entry.stream === "stdout" ? "stdout" : "sensei");
      span.setAttribute("data-id", String(Number(entry.id)));
      span.textContent = entry.line + "\n";
      log.appendChild(span);
      log.scrollTop = log.scrollHeight;
    });
    source.addEventListener("status", function (event) {
      source.close();
      var word = "";
      try {
        word = JSON.parse(event.data).status;
      } catch (e) {
        return;
      }
      setStatus(status, word);
      refreshFacts(function () {
        log.removeAttribute("data-follow");
        log.setAttribute("data-ended", word);
      });
    });
  }

  function showTime(iso) {
    return iso ? iso.replace("T", " ").slice(0, 19) + " UTC" : "—";
  }

  // Re-reads the deployment from the API once it has ended, for what is known only then.
  function refreshFacts(done) {
    var facts = document.getElementById("deployment");
    var url = facts && facts.getAttribute("data-view");
    if (!url || typeof fetch === "undefined") {
      done();
      return;
    }
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.ok ? response.json() : null;
      })
      .then(function (view) {
        if (view) {
          facts.querySelectorAll("[data-field]").forEach(function (field) {
            var name = field.getAttribute("data-field");
            var value = view[name];
            if (name === "error") {
              field.textContent = value ? value.step + ": " + value.message : "—";
            } else if (name === "duration_secs") {
              field.textContent = typeof value === "number" ? value.toFixed(1) + " s" : "—";
            } else if (name.slice(-3) === "_at") {
              field.textContent = showTime(value);
            } else {
              field.textContent = value || "—";
            }
          });
        }
      })
      .catch(function () {})
      .then(done);
  }

  function setStatus(holder, word) {
    if (!holder) {
      return;
    }
    var span = document.createElement("span");
    var tone = { succeeded: " ok", connected: " ok", failed: " bad", halted: " bad", aborted: " bad", rolled_back: " bad", offline: " bad", running: " busy", queued: " busy", waiting_approval: " busy", paused: " busy" }[word] || "";
    span.className = "status" + tone;
    span.setAttribute("data-status", word);
    span.textContent = word;
    holder.replaceChildren(span);
  }

  function stateKey(view) {
    if (view.state !== "paused") {
      return view.state;
    }
    return view.paused_reason && view.paused_reason.indexOf("approval") >= 0 ? "paused:approval" : "paused:operator";
  }

  function followRollout(box) {
    var url = box.getAttribute("data-follow");
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var source = new EventSource(url);
    source.addEventListener("rollout", function (event) {
      var view;
      try {
        view = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      setStatus(document.getElementById("rollout-state"), view.state);
      var reason = document.getElementById("rollout-reason");
      if (reason) {
        reason.textContent = view.paused_reason || view.halted_reason || "—";
      }
      var batch = document.getElementById("rollout-batch");
      if (batch) {
        batch.textContent = (view.current_batch === null ? 0 : view.current_batch + 1) + " of " + view.batch_count;
      }
      var counts = document.getElementById("target-counts");
      if (counts && view.target_counts) {
        var items = Object.keys(view.target_counts).map(function (name) {
          var li = document.createElement("li");
          li.setAttribute("data-count", name);
          li.textContent = name + ": " + view.target_counts[name];
          return li;
        });
        counts.replaceChildren.apply(counts, items);
      }
      (view.targets || []).forEach(function (target) {
        var row = document.querySelector('tr[data-target="' + String(target.server_id).replace(/[^0-9a-f-]/g, "") + '"]');
        if (!row) {
          return;
        }
        setStatus(row.querySelector('[data-field="status"]'), target.status);
        var error = row.querySelector('[data-field="error"]');
        if (error) {
          error.textContent = target.error || "";
        }
      });
      var key = stateKey(view);
      box.querySelectorAll("form[data-when]").forEach(function (form) {
        form.hidden = form.getAttribute("data-when").split(" ").indexOf(key) < 0;
      });
      box.setAttribute("data-state", key);
      if (["succeeded", "aborted", "rolled_back"].indexOf(view.state) >= 0 || (view.state === "halted" && view.finished_at)) {
        source.close();
      }
    });
  }

  // Agents' presence on the fleet and server pages: each event lists servers whose
  // connection or last-seen time changed; the rows (or the server's facts) that show them
  // are updated in place. The browser opens a new stream when one ends, until it is refused
  // (signed out).
  function followPresence(holder) {
    var url = holder.getAttribute("data-presence");
    if (!url || typeof EventSource === "undefined") {
      return;
    }
    var source = new EventSource(url);
    source.addEventListener("presence", function (event) {
      var servers;
      try {
        servers = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      (servers || []).forEach(function (server) {
        var id = String(server.id).replace(/[^0-9a-f-]/g, "");
        var place = holder.getAttribute("data-server") === id ? holder : holder.querySelector('[data-server="' + id + '"]');
        if (!place) {
          return;
        }
        setStatus(place.querySelector('[data-field="presence"]'), server.status);
        var seen = place.querySelector('[data-field="last_seen_at"]');
        if (seen) {
          var time = document.createElement("time");
          if (server.last_seen_at) {
            time.setAttribute("datetime", server.last_seen_at);
          }
          time.textContent = showTime(server.last_seen_at);
          seen.replaceChildren(time);
        }
      });
      holder.setAttribute("data-presence-seen", String(Date.now()));
    });
  }

  // Copy buttons: the text of the element the button names goes to the clipboard, and the
  // live region next to the button says whether it did (screen readers announce it).
  function selectText(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function copyButton(button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    var status = button.parentNode.querySelector(".copy-status");
    if (!source || !status) {
      return;
    }
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = source.textContent;
      var said = function (ok) {
        status.textContent = ok ? "Copied." : "Not copied: the text is selected, copy it with your keyboard.";
        status.setAttribute("data-copied", ok ? "yes" : "no");
        if (!ok) {
          selectText(source);
        }
      };
      status.textContent = "";
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(text).then(
          function () {
            said(true);
          },
          function () {
            said(false);
          }
        );
      } else {
        said(false);
      }
    });
  }

  // Security keys (WebAuthn). The server's options carry binary fields in base64url; the
  // browser's API takes and gives ArrayBuffers. The authenticator's answer goes back in an
  // ordinary form post, with the page's form token where the page has one.
  function fromBase64url(text) {
    var b64 = String(text).replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) {
      b64 += "=";
    }
    var raw = atob(b64);
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) {
      bytes[i] = raw.charCodeAt(i);
    }
    return bytes.buffer;
  }

  function toBase64url(buffer) {
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) {
      raw += String.fromCharCode(bytes[i]);
    }
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function withIds(list) {
    return (list || []).map(function (c) {
      var copy = Object.assign({}, c);
      copy.id = fromBase64url(c.id);
      return copy;
    });
  }

  function creationOptions(options) {
    var pk = Object.assign({}, options.publicKey);
    pk.challenge = fromBase64url(pk.challenge);
    pk.user = Object.assign({}, pk.user, { id: fromBase64url(pk.user.id) });
    pk.excludeCredentials = withIds(pk.excludeCredentials);
    return pk;
  }

  function requestOptions(options) {
    var pk = Object.assign({}, options.publicKey);
    pk.challenge = fromBase64url(pk.challenge);
    pk.allowCredentials = withIds(pk.allowCredentials);
    return pk;
  }

  function credentialJson(credential) {
    var r = credential.response;
    var response = { clientDataJSON: toBase64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toBase64url(r.attestationObject);
      if (typeof r.getTransports === "function") {
        response.transports = r.getTransports();
      }
    } else {
      response.authenticatorData = toBase64url(r.authenticatorData);
      response.signature = toBase64url(r.signature);
      response.userHandle = r.userHandle ? toBase64url(r.userHandle) : null;
    }
    return JSON.stringify({
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      response: response,
      extensions: {}
    });
  }

  function keyError(text) {
    var box = document.getElementById("key-error");
    if (box) {
      box.textContent = text;
      box.hidden = false;
    }
  }

  function keyUnavailable() {
    if (!window.PublicKeyCredential || !navigator.credentials) {
      keyError("This browser cannot use security keys here.");
      return true;
    }
    return false;
  }

  function registerKey(form) {
    form.addEventListener("submit", function (event) {
      if (form.elements.credential.value) {
        return;
      }
      event.preventDefault();
      if (keyUnavailable()) {
        return;
      }
      var body = new URLSearchParams();
      body.set("csrf", form.elements.csrf.value);
      fetch(form.getAttribute("data-options-url"), {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        body: body
      })
        .then(function (response) {
          return response.json().then(function (answer) {
            if (!response.ok) {
              throw new Error(answer.error || "the control plane refused");
            }
            return answer;
          });
        })
        .then(function (ceremony) {
          form.elements.challenge_id.value = ceremony.challenge_id;
          return navigator.credentials.create({ publicKey: creationOptions(ceremony.options) });
        })
        .then(function (credential) {
          form.elements.credential.value = credentialJson(credential);
          form.submit();
        })
        .catch(function (error) {
          keyError("The security key was not registered: " + (error && error.message ? error.message : error));
        });
    });
  }

  function useKey(form) {
    var button = document.getElementById("use-key");
    if (!button) {
      return;
    }
    button.addEventListener("click", function () {
      if (keyUnavailable()) {
        return;
      }
      var options;
      try {
        options = requestOptions(JSON.parse(form.getAttribute("data-options")));
      } catch (e) {
        keyError("The sign-in page is damaged; start again.");
        return;
      }
      navigator.credentials
        .get({ publicKey: options })
        .then(function (credential) {
          form.elements.assertion.value = credentialJson(credential);
          form.submit();
        })
        .catch(function (error) {
          keyError("The security key did not answer: " + (error && error.message ? error.message : error));
        });
    });
  }


  // A token emailed as a link travels in the URL's fragment, which no server sees: copy it
  // into its field, then drop it from the address bar and the history.
  function tokenFromFragment() {
    var field = document.querySelector('input[data-from-fragment="token"]');
    var match = /^#token=([A-Za-z0-9_.~-]+)$/.exec(window.location.hash);
    if (field && match) {
      field.value = match[1];
      window.history.replaceState(null, "", window.location.pathname);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    tokenFromFragment();
    var log = document.getElementById("log");
    if (log) {
      followLog(log);
    }
    var rollout = document.getElementById("rollout");
    if (rollout) {
      followRollout(rollout);
    }
    document.querySelectorAll("[data-presence]").forEach(followPresence);
    document.querySelectorAll("button[data-copy]").forEach(copyButton);
    var registration = document.querySelector("form[data-webauthn='create']");
    if (registration) {
      registerKey(registration);
    }
    var signIn = document.querySelector("form[data-webauthn='get']");
    if (signIn) {
      useKey(signIn);
    }
    document.documentElement.setAttribute("data-script", "ready");
  });
})();
