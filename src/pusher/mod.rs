//! The Pusher front end's node-side state: the configured apps (looked up by key for sockets,
//! by id for the HTTP API), each app's connection count on this node, and the broker channel
//! each Pusher channel travels on. The wire format is [`crate::protocol::pusher`]; sessions
//! speak it in [`crate::session`]; the signed HTTP API is [`api`].

pub mod api;
pub mod counts;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics as m;
use crate::settings::{self, PusherApp};

/// The apps of a node, immutable after start.
#[derive(Debug, Clone, Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    /// `activity_timeout` in whole seconds.
    pub activity_timeout: u64,
    /// Whether broker channel names carry a Redis Cluster hash tag.
    hash_tag: bool,
}

/// One app and its live connection count on this node.
#[derive(Debug)]
pub struct App {
    pub settings: PusherApp,
    connections: AtomicUsize,
}

/// One admitted connection of an app: held by the session, given back on drop.
#[derive(Debug)]
pub struct AppSlot(Arc<App>);

impl Drop for AppSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::PUSHER_CONNECTIONS, "app" => self.0.settings.id.clone()).decrement(1.0);
    }
}

impl std::ops::Deref for AppSlot {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

impl App {
    /// Takes a connection slot, unless the app has `max_connections` already (0: no cap).
    pub fn admit(self: &Arc<Self>) -> Option<AppSlot> {
        let max = match self.settings.max_connections {
            0 => usize::MAX,
            n => n,
        };
        self.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        metrics::gauge!(m::PUSHER_CONNECTIONS, "app" => self.settings.id.clone()).increment(1.0);
        Some(AppSlot(self.clone()))
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

impl Apps {
    pub fn new(settings: &settings::Pusher, hash_tag: bool) -> Self {
        let mut apps =
            Self { activity_timeout: settings.activity_timeout.as_secs().max(1), hash_tag, ..Self::default() };
        for app in &settings.apps {
            let app = Arc::new(App { settings: app.clone(), connections: AtomicUsize::new(0) });
            apps.by_key.insert(app.settings.key.clone(), app.clone());
            apps.by_id.insert(app.settings.id.clone(), app);
        }
        apps
    }

    pub fn is_enabled(&self) -> bool {
        !self.by_key.is_empty()
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id)
    }

    /// The broker channel of Pusher channel `channel` of app `app_id`: `pusher:<app>:<channel>`,
    /// or `pusher:{<app>:<channel>}` in `redis-cluster` mode (one slot per channel). Neither an
    /// app id nor a channel name may hold a brace, so the tag cannot be broken.
    pub fn broker_channel(&self, app_id: &str, channel: &str) -> Arc<str> {
        if self.hash_tag {
            format!("pusher:{{{app_id}:{channel}}}").into()
        } else {
            format!("pusher:{app_id}:{channel}").into()
        }
    }

    /// What every broker channel of app `app_id` starts with.
    pub fn broker_prefix(&self, app_id: &str) -> String {
        if self.hash_tag { format!("pusher:{{{app_id}:") } else { format!("pusher:{app_id}:") }
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<App>> {
        self.by_id.values()
    }
}
