//! The admin endpoint: `/healthz` (the process serves), `/readyz` (datapath attached and
//! listeners bound; not while draining) and `/metrics` (Prometheus).

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};

use tracing::warn;

use crate::{
    datapath::{Datapath, cgroup},
    proxy::OutboundProxy,
    telemetry::metrics::{self, WorkloadSample},
};

/// What the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    pub datapath: Arc<Datapath>,
    pub proxy: Arc<OutboundProxy>,
    pub ready: AtomicBool,
    /// cgroup paths by id: finding one walks the hierarchy, so each is looked up once.
    pub cgroup_paths: Mutex<HashMap<u64, String>>,
    /// The etcd control plane's state, in etcd mode.
    pub control: Option<Arc<crate::control::ControlStatus>>,
    /// Pod enrolment's state, on Kubernetes.
    pub pods: Option<Arc<crate::kube::PodEnrolmentStatus>>,
    /// The configured workloads' enrolment.
    pub workloads: Arc<crate::workloads::WorkloadKeeperStatus>,
    /// The node-to-node tunnel's counters (`mesh_tunnel_*`).
    pub tunnel: Arc<crate::tunnel::TunnelStats>,
    /// Workload identity, once started (`spec.identity`).
    pub identity: std::sync::OnceLock<crate::identity::Identities>,
}

impl AdminState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Serves the admin endpoint until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/identity", get(identity_handler))
        .with_state(state);
    let stopping = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(error) = axum::serve(listener, router)
        .with_graceful_shutdown(stopping)
        .await
    {
        warn!(%error, "admin endpoint failed");
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Per identity: certificate expiry, serial, issuance count and the last error (JSON).
async fn identity_handler(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let statuses = state
        .identity
        .get()
        .map(crate::identity::Identities::status)
        .unwrap_or_default();
    let body = serde_json::to_string_pretty(&statuses).unwrap_or_else(|_| "[]".to_owned());
    (StatusCode::OK, [("content-type", "application/json")], body)
}

async fn metrics_handler(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let rendered = tokio::task::spawn_blocking(move || render_metrics(&state)).await;
    match rendered {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            text,
        )
            .into_response(),
        Ok(Err(error)) => {
            warn!(%error, "reading datapath counters for /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading datapath counters failed: {error}\n"),
            )
                .into_response()
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

fn render_metrics(state: &AdminState) -> Result<String, crate::datapath::DatapathError> {
    let datapath = &state.datapath;
    let mount: &Path = datapath.cgroup_mount();
    let counters = datapath.maps().counters()?;
    let mut paths = state
        .cgroup_paths
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    paths.retain(|id, _| counters.iter().any(|entry| entry.cgroup_id == *id));
    let samples = counters
        .into_iter()
        .map(|entry| {
            let cgroup = paths
                .entry(entry.cgroup_id)
                .or_insert_with(|| {
                    cgroup::path_of_id(mount, entry.cgroup_id, 100_000)
                        .map(|path| path.display().to_string())
                        .unwrap_or_default()
                })
                .clone();
            WorkloadSample {
                workload: state.proxy.workload_name(entry.cgroup_id),
                cgroup,
                counters: entry.totals,
            }
        })
        .collect::<Vec<_>>();
    let events = datapath.maps().events()?;
    let mut text = metrics::render(
        &samples,
        &events,
        &state.proxy.stats(),
        state.ready.load(Ordering::Relaxed),
    );
    let policy = state.proxy.policy();
    let snapshot = policy.current();
    text.push_str(&metrics::render_l7(
        &state.proxy.http_stats(),
        &metrics::PolicySample {
            reloads_ok: policy.reloads_ok(),
            reloads_rejected: policy.reloads_rejected(),
            resources: snapshot.resource_count(),
            content_hash: snapshot.content_hash(),
        },
    ));
    text.push_str(&metrics::render_instances(snapshot.instances()));
    if let Some(control) = &state.control {
        text.push_str(&metrics::render_control(&control.sample()));
    }
    if let Some(pods) = &state.pods {
        text.push_str(&metrics::render_pods(&pods.sample()));
    }
    text.push_str(&metrics::render_configured_workloads(
        &state.workloads.sample(),
    ));
    text.push_str(&state.tunnel.render());
    if let Some(identity) = state.identity.get() {
        text.push_str(&identity.render_metrics());
    }
    Ok(text)
}
