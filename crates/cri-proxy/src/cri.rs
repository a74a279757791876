//! The part of CRI v1's `PullImageRequest` the proxy reads: the image and its `AuthConfig`.
//!
//! Only these fields are declared (numbers as in `runtime.v1`'s api.proto); prost skips the
//! rest. The decoded copy is used for nothing but credential capture: the request itself is
//! forwarded as the original bytes (see [`crate::codec`]).

use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use prost::Message;

use crate::store::{host_key, Credential};

/// gRPC path of `ImageService.PullImage`.
pub const PULL_IMAGE: &str = "/runtime.v1.ImageService/PullImage";

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

/// CRI's `AuthConfig`. Its `Debug` redacts everything but the user name and server.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
    /// base64 of `user:password`.
    #[prost(string, tag = "3")]
    pub auth: String,
    #[prost(string, tag = "4")]
    pub server_address: String,
    /// OAuth2 refresh token.
    #[prost(string, tag = "5")]
    pub identity_token: String,
    /// Bearer token for the registry.
    #[prost(string, tag = "6")]
    pub registry_token: String,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("AuthConfig")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
}

/// Why a pull's credential is not kept (for logs; never contains a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("request is not a PullImageRequest")]
    Undecodable,
    #[error("no credentials in the request")]
    Anonymous,
    #[error("image {0:?} is not a valid reference")]
    BadImage(String),
    #[error("credential is for {server} but the image is on {host}")]
    OtherServer { server: String, host: String },
    #[error("\"auth\" is not base64 of user:password")]
    BadAuth,
}

/// A pull's credential: the image reference and what to authenticate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullCredential {
    pub image: String,
    pub credential: Credential,
}

impl AuthConfig {
    /// The credential in containerd's order of precedence: user name (and password),
    /// identity token, `auth`; then the registry token, which containerd ignores.
    pub fn credential(&self) -> Result<Option<Credential>, Skip> {
        if !self.username.is_empty() {
            return Ok(Some(Credential::Basic {
                username: self.username.clone(),
                password: self.password.clone(),
            }));
        }
        if !self.identity_token.is_empty() {
            return Ok(Some(Credential::IdentityToken(self.identity_token.clone())));
        }
        if !self.auth.is_empty() {
            let decoded = base64::engine::general_purpose::STANDARD.decode(self.auth.trim()).map_err(|_| Skip::BadAuth)?;
            let s = String::from_utf8(decoded).map_err(|_| Skip::BadAuth)?;
            let (u, p) = s.split_once(':').ok_or(Skip::BadAuth)?;
            return Ok(Some(Credential::Basic {
                username: u.to_string(),
                password: p.trim_matches('\0').to_string(),
            }));
        }
        if !self.registry_token.is_empty() {
            return Ok(Some(Credential::RegistryToken(self.registry_token.clone())));
        }
        Ok(None)
    }
}

/// The credential a `PullImage` request carries, if it should be kept.
///
/// Like containerd, a credential whose `server_address` names another registry than the
/// image's is not used for the image (so not kept for it either).
pub fn pull_credential(request: &Bytes) -> Result<PullCredential, Skip> {
    let req = PullImageRequest::decode(request.clone()).map_err(|_| Skip::Undecodable)?;
    let image = req.image.map(|i| i.image).unwrap_or_default();
    let Some(auth) = req.auth else { return Err(Skip::Anonymous) };
    let (host, _) = crate::store::image_key(&image).map_err(|_| Skip::BadImage(image.clone()))?;
    if !auth.server_address.is_empty() {
        let server = host_key(&auth.server_address);
        if server != host {
            return Err(Skip::OtherServer { server, host });
        }
    }
    let credential = auth.credential()?.ok_or(Skip::Anonymous)?;
    Ok(PullCredential { image, credential })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(image: &str, auth: AuthConfig) -> Bytes {
        PullImageRequest {
            image: Some(ImageSpec { image: image.into() }),
            auth: Some(auth),
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn credentials_in_precedence_order() {
        let a = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            identity_token: "i".into(),
            ..Default::default()
        };
        assert_eq!(
            a.credential(),
            Ok(Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            }))
        );
        let a = AuthConfig {
            identity_token: "i".into(),
            auth: "dTpw".into(),
            ..Default::default()
        };
        assert_eq!(a.credential(), Ok(Some(Credential::IdentityToken("i".into()))));
        let a = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("user:pa:ss"),
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(
            a.credential(),
            Ok(Some(Credential::Basic {
                username: "user".into(),
                password: "pa:ss".into()
            }))
        );
        let a = AuthConfig {
            registry_token: "t".into(),
            ..Default::default()
        };
        assert_eq!(a.credential(), Ok(Some(Credential::RegistryToken("t".into()))));
        assert_eq!(AuthConfig::default().credential(), Ok(None));
        assert_eq!(
            AuthConfig {
                auth: "!!".into(),
                ..Default::default()
            }
            .credential(),
            Err(Skip::BadAuth)
        );
        assert_eq!(
            AuthConfig {
                auth: "bm9jb2xvbg==".into(),
                ..Default::default()
            }
            .credential(),
            Err(Skip::BadAuth)
        );
    }

    #[test]
    fn pull_requests() {
        let auth = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        let got = pull_credential(&request("busybox", auth.clone())).unwrap();
        assert_eq!(got.image, "busybox");
        for server in ["docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"] {
            let a = AuthConfig {
                server_address: server.into(),
                ..auth.clone()
            };
            assert!(pull_credential(&request("busybox", a)).is_ok(), "{server}");
        }
        let a = AuthConfig {
            server_address: "quay.io".into(),
            ..auth.clone()
        };
        assert!(matches!(pull_credential(&request("busybox", a)), Err(Skip::OtherServer { .. })));
        assert_eq!(pull_credential(&request("busybox", AuthConfig::default())), Err(Skip::Anonymous));
        assert!(matches!(pull_credential(&request("Bad Image", auth)), Err(Skip::BadImage(_))));
        let no_auth: Bytes = PullImageRequest {
            image: Some(ImageSpec { image: "x".into() }),
            auth: None,
        }
        .encode_to_vec()
        .into();
        assert_eq!(pull_credential(&no_auth), Err(Skip::Anonymous));
        assert_eq!(pull_credential(&Bytes::from_static(b"\xff\xff\xff")), Err(Skip::Undecodable));
    }

    #[test]
    fn debug_redacts() {
        let a = AuthConfig {
            username: "u".into(),
            password: "hunter2".into(),
            auth: "aHVudGVyMg==".into(),
            identity_token: "hunter2".into(),
            registry_token: "hunter2".into(),
            server_address: "r.io".into(),
        };
        let s = format!("{a:?} {:?}", PullImageRequest { image: None, auth: Some(a.clone()) });
        assert!(!s.contains("hunter2") && !s.contains("aHVudGVyMg"), "{s}");
        let s = format!("{:?}", pull_credential(&request("r.io/x", a)));
        assert!(!s.contains("hunter2"), "{s}");
    }
}
