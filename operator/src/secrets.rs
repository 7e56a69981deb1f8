//! The Secrets the operator generates, against the API: created when
//! missing, never overwritten (running nodes and RabbitMQ's volume hold
//! what is in them), the node certificate reissued only when it names
//! other addresses than the deployment needs; and what happens to them
//! when the SnsCluster goes (`storage.retention`).
//!
//! Their values are never logged; the reconciler gets back only what the
//! operator's own calls to the coordinator need ([`Credentials`]).

use crate::coordinator::Credentials;
use crate::crd::PvcRetention;
use crate::error::{Error, Result};
use crate::render::tls::{self, CertUse, Pem, TLS_NAMES_ANNOTATION};
use crate::render::{self, MANAGER, Names, Rendered, TlsPlan};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

fn create_params() -> PostParams {
    PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }
}

fn text(secret: &Secret, key: &str) -> Result<String> {
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
    let bytes = bytes.ok_or_else(|| Error::BadSecret(secret.name_any(), format!("no key {key:?}")))?;
    String::from_utf8(bytes).map_err(|_| Error::BadSecret(secret.name_any(), format!("{key:?} is not text")))
}

/// Creates `secret`; Ok(false) if it exists already.
async fn create(api: &Api<Secret>, secret: &Secret) -> Result<bool> {
    match api.create(&create_params(), secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure every Secret the rendered SnsCluster needs exists, and
/// returns what the operator's calls to its coordinator need.
pub async fn ensure(client: &Client, names: &Names, rendered: &Rendered) -> Result<Credentials> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    if let Some(template) = &rendered.broker_secret {
        let secret = render::broker_secret(template, names, &render::random_password()?);
        if create(&api, &secret).await? {
            tracing::info!(secret = %names.rabbitmq_secret(), "broker credentials created");
        }
    }
    if let Some(template) = &rendered.broker_cookie {
        // Created once: a new cookie would cut the running nodes off from
        // each other. 32 letters and digits, as Erlang wants them.
        let secret = render::cookie_secret(template, &render::random_password()?);
        if create(&api, &secret).await? {
            tracing::info!(secret = %names.rabbitmq_cookie(), "broker Erlang cookie created");
        }
    }
    let secret = node_secret(&api, names, rendered).await?;
    let ca = match &rendered.tls {
        TlsPlan::Off => None,
        TlsPlan::Operator { names: tls_names, broker } => {
            Some(operator_tls(&api, names, tls_names, broker.as_deref()).await?)
        }
        // Until cert-manager has issued it, the coordinator has no
        // certificate to serve either.
        TlsPlan::CertManager => match api.get_opt(&names.tls_secret()).await? {
            Some(s) => text(&s, "ca.crt").ok(),
            None => None,
        },
    };
    Ok(Credentials { secret: Some(secret), ca })
}

async fn node_secret(api: &Api<Secret>, names: &Names, rendered: &Rendered) -> Result<sns_node::auth::Secret> {
    let value = match api.get_opt(&names.node_secret()).await? {
        Some(s) => text(&s, render::secrets::NODE_SECRET_KEY)?,
        None => {
            let value = sns_node::auth::Secret::generate().map_err(|e| Error::Random(e.to_string()))?;
            let secret = render::node_secret(&rendered.node_secret, &value);
            if !create(api, &secret).await? {
                // Someone made it between our read and our create: theirs
                // wins; the next reconcile reads it.
                return Err(Error::BadSecret(names.node_secret(), "created concurrently; read it next time".into()));
            }
            tracing::info!(secret = %names.node_secret(), "node secret created");
            value
        }
    };
    sns_node::auth::Secret::from_text(&value).map_err(|e| Error::BadSecret(names.node_secret(), e.to_string()))
}

/// The operator's CA (made once), a node certificate for `tls_names` and,
/// for a managed broker, the broker's certificate for `broker_names`, both
/// signed by it (each made when missing, or reissued when it names other
/// addresses or chains to another CA). Returns the CA certificate.
async fn operator_tls(
    api: &Api<Secret>,
    names: &Names,
    tls_names: &[String],
    broker_names: Option<&[String]>,
) -> Result<String> {
    let (ca, new_ca) = match api.get_opt(&names.ca_secret()).await? {
        Some(s) => (Pem { cert: text(&s, "tls.crt")?, key: text(&s, "tls.key")? }, false),
        None => {
            let ca = tls::new_ca(names)?;
            if !create(api, &tls::ca_secret(names, &ca)).await? {
                return Err(Error::BadSecret(names.ca_secret(), "created concurrently; read it next time".into()));
            }
            tracing::info!(secret = %names.ca_secret(), "CA created");
            (ca, true)
        }
    };
    certificate(api, names, names.tls_secret(), tls_names, &ca, new_ca, CertUse::Node).await?;
    if let Some(broker_names) = broker_names {
        certificate(api, names, names.rabbitmq_tls_secret(), broker_names, &ca, new_ca, CertUse::Broker).await?;
    }
    Ok(ca.cert)
}

/// The certificate Secret `name` for `tls_names`, issued by `ca` unless
/// the one there already is (same names, same CA).
async fn certificate(
    api: &Api<Secret>,
    names: &Names,
    name: String,
    tls_names: &[String],
    ca: &Pem,
    new_ca: bool,
    usage: CertUse,
) -> Result<()> {
    let checksum = tls::names_checksum(tls_names);
    let current = api.get_opt(&name).await?;
    let fresh = current.as_ref().is_some_and(|s| {
        !new_ca
            && s.annotations().get(TLS_NAMES_ANNOTATION) == Some(&checksum)
            && text(s, "ca.crt").is_ok_and(|c| c == ca.cert)
    });
    if !fresh {
        let cert = tls::issue_cert(names, tls_names, ca, usage)?;
        let mut secret = tls::cert_secret(name.clone(), names, &cert, &ca.cert, &checksum);
        match current {
            None => {
                create(api, &secret).await?;
            }
            Some(old) => {
                secret.metadata.resource_version = old.metadata.resource_version;
                api.replace(&name, &create_params(), &secret).await?;
            }
        }
        tracing::info!(secret = %name, "certificate issued");
    }
    Ok(())
}

/// When the SnsCluster goes: with `Delete` its generated Secrets go too;
/// with `Retain` they stay, and any owner reference an older operator put
/// on them is dropped first, so garbage collection does not take them.
pub async fn on_delete(client: &Client, names: &Names, retention: PvcRetention) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    match retention {
        PvcRetention::Delete => {
            api.delete_collection(&DeleteParams::default(), &ListParams::default().labels(&names.selector())).await?;
        }
        PvcRetention::Retain => {
            let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
            let orphan = serde_json::json!({"metadata": {"ownerReferences": null}});
            for name in [
                names.rabbitmq_secret(),
                names.rabbitmq_cookie(),
                names.node_secret(),
                names.ca_secret(),
                names.tls_secret(),
                names.rabbitmq_tls_secret(),
            ] {
                match api.patch(&name, &params, &Patch::Merge(&orphan)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

fn certificates(client: &Client, names: &Names) -> Api<kube::api::DynamicObject> {
    let resource = kube::api::ApiResource {
        group: "cert-manager.io".into(),
        version: "v1".into(),
        api_version: "cert-manager.io/v1".into(),
        kind: "Certificate".into(),
        plural: "certificates".into(),
    };
    Api::namespaced_with(client.clone(), &names.namespace, &resource)
}

/// Server-side applies the cert-manager Certificate.
pub async fn apply_certificate(client: &Client, names: &Names, certificate: &serde_json::Value) -> Result<()> {
    let name = certificate["metadata"]["name"].as_str().unwrap_or_default();
    certificates(client, names).patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(certificate)).await?;
    Ok(())
}

/// Deletes the Certificate `name` of an SnsCluster that no longer asks
/// cert-manager for it (TLS off, the operator's own CA, no managed
/// broker): it would otherwise keep rewriting a Secret the operator now
/// manages. Not found (or cert-manager not installed) is fine.
pub async fn retire_certificate(client: &Client, names: &Names, name: &str) -> Result<()> {
    match certificates(client, names).delete(name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(certificate = %name, "cert-manager Certificate removed");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}
