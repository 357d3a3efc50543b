//! `ceiling`: a bare hyper 1 HTTP/1.1 server (keep-alive, multi-threaded tokio runtime) that
//! reads each whole request body and answers `200 OK` with a small body, for any method and
//! path. Point `run --target` at it with the same mix to see what the client, the loopback and
//! hyper itself can do on this machine: the ceiling the gateway is compared against.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;

const BODY: &[u8] = b"OK\n";

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole body, like a real handler would, before answering.
    let status = match req.into_body().collect().await {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

/// Serves connections from `listener` until the task is dropped.
pub async fn serve(listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                eprintln!("ceiling: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

/// Runs the server until Ctrl-C / SIGTERM.
pub async fn run(listen: &str) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: cannot bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    eprintln!("ceiling: listening on http://{addr} (200 OK for any request; Ctrl-C to stop)");
    let server = tokio::spawn(serve(listener));
    shutdown_signal().await;
    server.abort();
    eprintln!("ceiling: stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_any_path_with_200_and_keeps_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener));
        let client = crate::run::client(4, std::time::Duration::from_secs(5));
        for (path, body) in [("/v1/events", "{}"), ("/anything/else?x=1", "a=b")] {
            let req = Request::post(format!("http://{addr}{path}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let b = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&b[..], BODY);
        }
        server.abort();
    }
}
