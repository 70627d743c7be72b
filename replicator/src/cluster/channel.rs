//! The etcd client's connections, with Nagle's algorithm off.
//!
//! etcd-client built with `tls-openssl` dials every endpoint, plain ones too, through a hyper
//! connector left at its default, `TCP_NODELAY` off. A gRPC request goes out in more than one
//! write, and the second waited for etcd's delayed acknowledgement of the first: 40 ms on about
//! half of the requests, 130-170 ms per promotion or switchover grant (three or four requests),
//! measured in session 17. [`NoDelay`] builds the client's channel instead: the same connections
//! etcd-client makes (plain, or OpenSSL for `https://`) over a connector that sets it, balanced
//! over the endpoints as etcd-client balances them (an endpoint whose request failed is avoided
//! for [`FAILED_AVOID`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use etcd_client::{BalancedChannelBuilder, Channel};
use hyper_openssl::client::legacy::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;
use tower::load::Load;
use tower::Service;

/// How long an endpoint whose request failed is avoided, while another one answers: 1 s, about a
/// node lease, so a member that died is tried again soon after it may be back (etcd-client starts
/// at 1 s too, and doubles it while failures go on).
pub const FAILED_AVOID: Duration = Duration::from_secs(1);

/// Endpoints the client announces, waiting to be connected (etcd-client's own bound).
const ENDPOINTS_QUEUED: usize = 16;

type Updates = tokio::sync::mpsc::Sender<Change<http::Uri, Endpoint>>;

/// The channel for [`etcd_client::Client::connect_with_balanced_channel`]: plain, or over TLS
/// with this connector configuration.
pub struct NoDelay(pub Option<openssl::ssl::SslConnectorBuilder>);

impl BalancedChannelBuilder for NoDelay {
    type Error = etcd_client::Error;

    fn balanced_channel(self, buffer: usize) -> Result<(Channel, Updates), Self::Error> {
        // Plain endpoints (`http://`) pass through the TLS connector untouched; it is used for both
        // so that both get the balancing below. (tonic's own balanced channel keeps sending to a
        // member that is down: half of the requests after a member was lost failed.)
        let ssl = match self.0 {
            Some(ssl) => ssl,
            None => openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?,
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = HttpsConnector::with_connector(http, ssl)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Change<http::Uri, Endpoint>>(ENDPOINTS_QUEUED);
        // Each endpoint the client announces becomes a connection, made when first used.
        let discover = futures_util::stream::unfold(rx, move |mut rx| {
            let https = https.clone();
            async move {
                let change = match rx.recv().await? {
                    Change::Insert(uri, e) => {
                        tower::discover::Change::Insert(uri, Avoided::new(e.connect_with_connector_lazy(https)))
                    }
                    Change::Remove(uri) => tower::discover::Change::Remove(uri),
                };
                Some((Ok::<_, std::convert::Infallible>(change), rx))
            }
        });
        let balance = tower::balance::p2c::Balance::new(Box::pin(discover));
        let buffered = tower::buffer::Buffer::new(balance, buffer);
        Ok((Channel::Custom(tower::util::BoxCloneSyncService::new(buffered)), tx))
    }
}

/// A connection that reports itself loaded for [`FAILED_AVOID`] after a request on it failed: the
/// balancer, choosing the less loaded of two, then sends to another endpoint.
struct Avoided<S> {
    inner: S,
    failed_at: Arc<Mutex<Option<Instant>>>,
}

impl<S> Avoided<S> {
    fn new(inner: S) -> Self {
        Avoided { inner, failed_at: Arc::new(Mutex::new(None)) }
    }
}

impl<S> Load for Avoided<S> {
    type Metric = bool;

    fn load(&self) -> bool {
        self.failed_at.lock().expect("failed_at").is_some_and(|t| t.elapsed() < FAILED_AVOID)
    }
}

impl<S, Req> Service<Req> for Avoided<S>
where
    S: Service<Req>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (call, failed_at) = (self.inner.call(req), self.failed_at.clone());
        Box::pin(async move {
            let r = call.await;
            *failed_at.lock().expect("failed_at") = r.is_err().then(Instant::now);
            r
        })
    }
}
