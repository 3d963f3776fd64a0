//! A flight's first two steps, which a request takes while it reads the caches, before it
//! knows it will wait (one round trip on a miss rather than two after the caches' one): the
//! key's subscription, then its last stored event. Dropped unused (a hit, a refusal), it
//! unsubscribes.

use std::time::Instant;

use tokio::sync::watch;
use versus_shared::{
    bus::Bus,
    history::{self, Last},
    key::Key,
    wire::{self, Event, Kind},
};

/// The key's subscription, made before anything else of the flight, and what was read after it.
pub struct Prefetch {
    pub(crate) began: Instant,
    pub(crate) live: async_nats::Subscriber,
    /// Moves when messages may have been lost since the subscription was made.
    pub(crate) losses: watch::Receiver<u64>,
    pub(crate) last: LastStored,
}

/// The last event the key's events subject held once the subscription was in place.
pub enum LastStored {
    /// Not read (the read failed): whoever needs it reads it again.
    Unread,
    /// The subject held nothing.
    Nothing,
    Found(Last),
}

impl LastStored {
    /// Whether it shows a generation under way (`started`, a chunk or a partial image last);
    /// None when unread.
    pub fn under_way(&self) -> Option<bool> {
        match self {
            LastStored::Unread => None,
            LastStored::Nothing => Some(false),
            LastStored::Found(last) => Some(matches!(
                last.event,
                Some(Event::Started { .. } | Event::Chunk { .. } | Event::Partial { .. })
            )),
        }
    }

    /// What `history::last` answered.
    pub fn of(read: anyhow::Result<Option<Last>>) -> LastStored {
        match read {
            Ok(Some(last)) => LastStored::Found(last),
            Ok(None) => LastStored::Nothing,
            Err(_) => LastStored::Unread,
        }
    }
}

impl Prefetch {
    /// Subscribes to the events of `key`, then reads the last one stored. None when the
    /// subscription fails: the reader then tries again itself (and reads the last event again
    /// when this read failed).
    pub async fn read(bus: &Bus, kind: Kind, key: &Key) -> Option<Prefetch> {
        let subject = wire::events_subject(kind, key);
        let mut prefetch = Prefetch::subscribe(bus, &subject).await.ok()?;
        prefetch.last = LastStored::of(history::last(bus, &subject).await);
        Some(prefetch)
    }

    /// The first step alone: the subscription, from which lost messages are counted.
    pub(crate) async fn subscribe(bus: &Bus, subject: &str) -> anyhow::Result<Prefetch> {
        let began = Instant::now();
        let mut losses = bus.losses.clone();
        losses.mark_unchanged();
        let live = bus.client.subscribe(subject.to_owned()).await?;
        Ok(Prefetch {
            began,
            live,
            losses,
            last: LastStored::Unread,
        })
    }
}
