//! One router per resource, merged in [`crate::router`].

pub mod accounts;
pub mod batches;
pub mod functions;
pub mod invoke;
pub mod jobs;
pub mod secrets;
pub mod system;
pub mod v1compat;

/// A server-sent event stream fed by a task through a small channel; the task sees
/// the client leave through its sender (`closed()`, or a failed send).
pub(crate) fn task_stream<F, Fut>(
    f: F,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<axum::response::sse::Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}
