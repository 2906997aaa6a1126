//! The benchmark's endpoint: answers every `POST …/@connections/{id}` at
//! once (or after `--delay-ms`, API Gateway's round trip), 200 with an empty
//! body, or 410 GoneException for the ids [`is_gone`] names, as API Gateway
//! does. HTTP/1.1 keep-alive, plain or TLS (a certificate made at bench time
//! by a test CA the worker trusts through `SSL_CERT_FILE`), one thread (the
//! script pins it to its own core).

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::audience::is_gone;

/// The sink's certificate chain and key (PEM files), for its TLS mode.
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

pub async fn serve(port: u16, tls: Option<TlsFiles<'_>>, delay: Duration) -> anyhow::Result<()> {
    let acceptor = tls.map(acceptor).transpose()?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!(
        "sink listening on 127.0.0.1:{port} ({})",
        if acceptor.is_some() { "TLS" } else { "plain" }
    );
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // A client closing its connection (or failing its handshake) is
            // not the sink's problem.
            match acceptor {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        connection(stream, delay).await;
                    }
                }
                None => connection(stream, delay).await,
            }
        });
    }
}

async fn connection<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: T,
    delay: Duration,
) {
    let _ = http1::Builder::new()
        .serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| answer(request, delay)),
        )
        .await;
}

fn acceptor(files: TlsFiles<'_>) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(files.cert)
        .with_context(|| format!("read {}", files.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("parse the sink's certificate chain")?;
    let key = PrivateKeyDer::from_pem_file(files.key)
        .with_context(|| format!("read the key {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the sink's certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn answer(
    request: Request<Incoming>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let gone = request.uri().path().rsplit('/').next().is_some_and(is_gone);
    // Read the payload, as API Gateway does, before answering.
    let _ = request.into_body().collect().await;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = if gone {
        Response::builder()
            .status(410)
            .header("x-amzn-ErrorType", "GoneException")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"message":"Gone"}"#)))
    } else {
        Response::builder()
            .status(200)
            .body(Full::new(Bytes::new()))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}
