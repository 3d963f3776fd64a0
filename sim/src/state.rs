//! The simulator's shared state: live knobs, the fault list, call stats and served image files.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::{Knobs, KnobsPatch};
use crate::faults::{Fault, FaultQueue, FaultRule};
use crate::moderation::Flag;
use crate::stats::{Call, CallKind, Stats};

/// Url-mode images kept for download; the oldest go first so long benchmarks stay bounded.
const MAX_KEPT_FILES: usize = 512;

/// A cheap handle on the simulator; clone it freely.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

struct Inner {
    startup: Knobs,
    live: Mutex<Live>,
    /// Cancelled at shutdown so stalled requests let graceful shutdown finish.
    stop: CancellationToken,
    next_id: AtomicU64,
}

struct Live {
    knobs: Knobs,
    faults: FaultQueue,
    stats: Stats,
    files: HashMap<String, Bytes>,
    file_order: VecDeque<String>,
    local_addr: Option<SocketAddr>,
    /// What the moderation endpoint flags; set at start-up, kept by a reset.
    flags: Vec<Flag>,
}

impl Sim {
    /// A simulator whose `POST /_sim/reset` returns to `knobs`.
    pub fn new(knobs: Knobs) -> Self {
        let live = Live {
            knobs,
            faults: FaultQueue::default(),
            stats: Stats::default(),
            files: HashMap::new(),
            file_order: VecDeque::new(),
            local_addr: None,
            flags: Vec::new(),
        };
        Self {
            inner: Arc::new(Inner {
                startup: knobs,
                live: Mutex::new(live),
                stop: CancellationToken::new(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // The state stays consistent even if a holder panicked: every update is a single step.
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn knobs(&self) -> Knobs {
        self.live().knobs
    }

    pub fn patch_knobs(&self, patch: &KnobsPatch) -> Knobs {
        let mut live = self.live();
        live.knobs.apply(patch);
        live.knobs
    }

    pub fn add_fault(&self, rule: FaultRule) -> Vec<FaultRule> {
        let mut live = self.live();
        live.faults.push(rule);
        live.faults.list()
    }

    pub fn faults(&self) -> Vec<FaultRule> {
        self.live().faults.list()
    }

    pub fn clear_faults(&self) {
        self.live().faults.clear();
    }

    pub fn take_fault(&self, kind: CallKind) -> Option<Fault> {
        self.live().faults.take(kind)
    }

    /// Makes the moderation endpoint flag inputs holding one of `flags`.
    pub fn set_moderation_flags(&self, flags: Vec<Flag>) {
        self.live().flags = flags;
    }

    pub fn moderation_flags(&self) -> Vec<Flag> {
        self.live().flags.clone()
    }

    pub fn record(&self, call: Call) {
        self.live().stats.record(call);
    }

    /// Counts a chat stream its client dropped before the answer's end.
    pub fn note_abandoned_chat(&self) {
        self.live().stats.chat_abandoned += 1;
    }

    /// Counts a partial image sent on an image stream.
    pub fn note_partial_sent(&self) {
        self.live().stats.partials_sent += 1;
    }

    pub fn stats(&self) -> Stats {
        self.live().stats.clone()
    }

    /// Clears stats, faults and files, and puts the start-up knobs back.
    pub fn reset(&self) {
        let mut live = self.live();
        live.knobs = self.inner.startup;
        live.faults.clear();
        live.stats = Stats::default();
        live.files.clear();
        live.file_order.clear();
    }

    pub fn store_file(&self, id: String, bytes: Bytes) {
        let mut live = self.live();
        if live.files.insert(id.clone(), bytes).is_some() {
            return;
        }
        live.file_order.push_back(id);
        if live.file_order.len() > MAX_KEPT_FILES
            && let Some(old) = live.file_order.pop_front()
        {
            live.files.remove(&old);
        }
    }

    pub fn file(&self, id: &str) -> Option<Bytes> {
        self.live().files.get(id).cloned()
    }

    /// A process-unique number for completion ids.
    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Completes once the simulator is shutting down.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await;
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    pub(crate) fn set_local_addr(&self, addr: SocketAddr) {
        self.live().local_addr = Some(addr);
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.live().local_addr
    }
}
