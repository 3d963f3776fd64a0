//! Group commit: requests that arrive while a batch runs wait and go together in the next one,
//! as a database's group commit does, so that a burst costs a few statements (and durable
//! commits) rather than one each. [`crate::claims::Claimer`] batches claims with it, and
//! [`crate::spend::Ledger`] spend records.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use versus_shared::tasks::Tasks;

/// The most requests one batch carries: it bounds the size of one statement (its arrays of
/// parameters) and how long the batch's first caller waits for the last row.
pub const MAX_BATCH: usize = 256;

/// Hands requests (`In`) to one task, which runs them in batches and answers each caller with
/// its own `Out`. Cheap to clone; the task ends once every clone is dropped, after answering
/// what was asked before.
pub struct Batcher<In, Out> {
    requests: mpsc::UnboundedSender<(In, oneshot::Sender<Out>)>,
}

impl<In, Out> Clone for Batcher<In, Out> {
    fn clone(&self) -> Self {
        Batcher {
            requests: self.requests.clone(),
        }
    }
}

/// The batching task is gone: the process is stopping, or the task panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batching task has stopped")]
pub struct Stopped;

impl<In: Send + 'static, Out: Send + 'static> Batcher<In, Out> {
    /// Starts the task, on `tasks`, that takes the requests waiting (up to [`MAX_BATCH`]) and
    /// runs `run` on them, one batch at a time. `run` answers each request of the batch, in
    /// order: the callers of requests it gives no answer for get [`Stopped`].
    pub fn start<F, Fut>(tasks: &Tasks, run: F) -> Batcher<In, Out>
    where
        F: FnMut(Vec<In>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Out>> + Send,
    {
        Batcher::start_with(tasks, run, |_| {})
    }

    /// [`Batcher::start`], handing each answer whose caller stopped waiting to `undelivered`
    /// (an answer that holds something, such as a reservation, that must not be lost).
    pub fn start_with<F, Fut>(
        tasks: &Tasks,
        mut run: F,
        undelivered: impl Fn(Out) + Send + 'static,
    ) -> Batcher<In, Out>
    where
        F: FnMut(Vec<In>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Out>> + Send,
    {
        let (requests, mut queue) = mpsc::unbounded_channel::<(In, oneshot::Sender<Out>)>();
        tasks.spawn(async move {
            let mut batch = Vec::new();
            while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (inputs, replies): (Vec<In>, Vec<_>) = batch.drain(..).unzip();
                let outputs = run(inputs).await;
                for (reply, output) in replies.into_iter().zip(outputs) {
                    // A caller that stopped waiting (its job was dropped) gets no answer.
                    if let Err(output) = reply.send(output) {
                        undelivered(output);
                    }
                }
            }
        });
        Batcher { requests }
    }

    /// Puts `input` in the next batch without waiting for its answer (from where one cannot
    /// wait, such as a `Drop`).
    pub fn send(&self, input: In) -> Result<(), Stopped> {
        let (reply, _) = oneshot::channel();
        self.requests.send((input, reply)).map_err(|_| Stopped)
    }

    /// Puts `input` in the next batch and waits for its answer.
    pub async fn call(&self, input: In) -> Result<Out, Stopped> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((input, reply)).map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn requests_that_wait_go_together_and_each_gets_its_answer() {
        let tasks = Tasks::new();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let doubler = Batcher::start(&tasks, move |inputs: Vec<u32>| {
            seen.lock().unwrap().push(inputs.len());
            async move { inputs.into_iter().map(|n| n * 2).collect::<Vec<_>>() }
        });
        let answers = futures::future::join_all((0..600).map(|n| doubler.call(n))).await;
        let answers: Vec<u32> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, (0..600).map(|n| n * 2).collect::<Vec<_>>());
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 600);
        assert!(sizes.iter().all(|&n| n <= MAX_BATCH), "{sizes:?}");
        assert!(sizes.len() < 600, "{sizes:?}");
    }

    #[tokio::test]
    async fn a_request_left_unanswered_learns_the_batcher_stopped() {
        let tasks = Tasks::new();
        let none = Batcher::start(&tasks, |_: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(none.call(1).await, Err(Stopped));
    }
}
