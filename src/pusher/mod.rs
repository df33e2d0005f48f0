//! The Pusher front end's node-side state: the configured apps (looked up by key for sockets,
//! by id for the HTTP API), each app's connection count on this node, and the broker channel
//! each Pusher channel travels on. The wire format is [`crate::protocol::pusher`]; sessions
//! speak it in [`crate::session`]; the signed HTTP API is [`api`].

pub mod api;
pub mod counts;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::value::RawValue;

use crate::metrics as m;
use crate::settings::{self, PusherApp};

/// The apps of a node, immutable after start.
#[derive(Debug, Clone, Default)]
pub struct Apps {
    by_key: HashMap<String, Arc<App>>,
    by_id: HashMap<String, Arc<App>>,
    /// Laravel notifications kept in the inbox (`pusher.persist_notifications`), if on.
    pub notifications: Option<Arc<Notifications>>,
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
        let notifications = settings.persist_notifications.then(|| {
            let (prefix, suffix) = settings.notification_channel.split_once("{user}").unwrap_or_default();
            Arc::new(Notifications {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
                event: settings.notification_event.clone(),
            })
        });
        let mut apps = Self {
            activity_timeout: settings.activity_timeout.as_secs().max(1),
            hash_tag,
            notifications,
            ..Self::default()
        };
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

/// Laravel's broadcast notifications, kept in the user's inbox: which channel and event they
/// are, and how a kept one is marked in the data a socket gets.
#[derive(Debug)]
pub struct Notifications {
    prefix: String,
    suffix: String,
    pub event: String,
}

impl Notifications {
    /// The inbox user whose notification channel `channel` is, if it is one.
    pub fn user_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let user = channel.strip_prefix(&self.prefix)?.strip_suffix(&self.suffix)?;
        crate::channel::valid_name(user).then_some(user)
    }

    /// Whether `event` on `channel` is a notification to keep; the user if so.
    pub fn kept<'a>(&self, event: &str, channel: &'a str) -> Option<&'a str> {
        if event == self.event { self.user_of(channel) } else { None }
    }
}

/// The data of a kept notification as a socket gets it: the application's data (an object,
/// or a string holding one, as Laravel sends it) with a `pushnode` member added, `{"id": the
/// inbox id, "unread": the count after it}` live or `{"id", "replay": true}` when replayed.
/// The `id` is what `pushnode:read` takes. Data that is not an object is left as it is.
pub fn tag_notification(data: &RawValue, id: &str, unread: Option<u64>) -> Box<RawValue> {
    let (text, as_string) = match serde_json::from_str::<String>(data.get()) {
        Ok(inner) => (inner, true),
        Err(_) => (data.get().to_owned(), false),
    };
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str::<serde_json::Value>(&text) else {
        return data.to_owned();
    };
    let tag = match unread {
        Some(unread) => serde_json::json!({ "id": id, "unread": unread }),
        None => serde_json::json!({ "id": id, "replay": true }),
    };
    object.insert("pushnode".into(), tag);
    let tagged = serde_json::Value::Object(object).to_string();
    let tagged = if as_string { serde_json::to_string(&tagged).unwrap_or_default() } else { tagged };
    RawValue::from_string(tagged).unwrap_or_else(|_| data.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_recognised_and_tagged() {
        let n = Notifications { prefix: "private-App.Models.User.".into(), suffix: String::new(), event: "N".into() };
        assert_eq!(n.kept("N", "private-App.Models.User.42"), Some("42"));
        assert_eq!(n.kept("Other", "private-App.Models.User.42"), None);
        assert_eq!(n.kept("N", "private-App.Models.Team.42"), None);
        assert_eq!(n.kept("N", "private-App.Models.User.bad{id}"), None);

        let as_string = RawValue::from_string(r#""{\"title\":\"Hi\"}""#.into()).unwrap();
        let tagged = tag_notification(&as_string, "1-0", Some(3));
        let inner: String = serde_json::from_str(tagged.get()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&inner).unwrap();
        assert_eq!(value, serde_json::json!({"title": "Hi", "pushnode": {"id": "1-0", "unread": 3}}));
        let object = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        let value: serde_json::Value = serde_json::from_str(tag_notification(&object, "2-0", None).get()).unwrap();
        assert_eq!(value, serde_json::json!({"a": 1, "pushnode": {"id": "2-0", "replay": true}}));
        let number = RawValue::from_string("5".into()).unwrap();
        assert_eq!(tag_notification(&number, "3-0", None).get(), "5");
    }
}
