//! The control plane's Ed25519 job-signing key: created at first start, stored sealed under
//! the field key, shared by every replica. Agents pin its public half at enrollment.

use deadpool_postgres::Pool;
use ed25519_dalek::SigningKey;

use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::pki::PkiError;

const NAME: &str = "job-signing";

/// Loads the key, creating it on the very first start.
pub async fn load_or_create(pool: &Pool, keys: &FieldKeys) -> Result<SigningKey, PkiError> {
    let client = pool.get().await?;
    let fresh = SigningKey::generate(&mut rand::rngs::OsRng);
    // Replicas starting together: the first insert wins, everyone reads the stored row.
    client
        .execute(
            "INSERT INTO signing_keys (name, public_key, private_key_ciphertext) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
            &[
                &NAME,
                &fresh.verifying_key().to_bytes().as_slice(),
                &keys.encrypt(&fresh.to_bytes()),
            ],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT public_key, private_key_ciphertext FROM signing_keys WHERE name = $1",
            &[&NAME],
        )
        .await?;
    let secret = keys
        .decrypt(row.get::<_, &str>(1))
        .map_err(|_| PkiError::WrongFieldKey("job-signing"))?;
    let secret: [u8; 32] = secret
        .try_into()
        .map_err(|_| PkiError::Db("stored job-signing key has the wrong length".into()))?;
    let key = SigningKey::from_bytes(&secret);
    let public: &[u8] = row.get(0);
    if public != key.verifying_key().to_bytes().as_slice() {
        return Err(PkiError::Db(
            "stored job-signing public key does not match its private key".into(),
        ));
    }
    Ok(key)
}
