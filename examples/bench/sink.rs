//! The benchmark's endpoint: answers every `POST …/@connections/{id}` at
//! once, 200 with an empty body, or 410 GoneException for the ids
//! [`is_gone`] names, as API Gateway does. HTTP/1.1 keep-alive, no TLS, one
//! thread (the script pins it to its own core).

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::audience::is_gone;

pub async fn serve(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("sink listening on 127.0.0.1:{port}");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            // A client closing its connection is not the sink's problem.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let gone = request.uri().path().rsplit('/').next().is_some_and(is_gone);
    // Read the payload, as API Gateway does, before answering.
    let _ = request.into_body().collect().await;
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
