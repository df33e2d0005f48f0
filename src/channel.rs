//! Channel naming: how a user id or a topic name becomes the broker channel that carries its
//! messages, and which names are acceptable at all.
//!
//! The rule (documented in the README): `broker.user_channel` and `broker.topic_channel` are
//! patterns in which `{user}` / `{topic}` stand for the id. In `redis-cluster` mode the id is
//! wrapped in a hash tag (`push:message:{42}`), so all keys of one user share a slot.

use std::sync::Arc;

/// Longest user id or topic name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// What a broker channel carries: one user's notifications, or a topic's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    User(Arc<str>),
    Topic(Arc<str>),
}

/// Maps ids to broker channel names and back.
#[derive(Debug, Clone)]
pub struct ChannelNames {
    user_prefix: String,
    user_suffix: String,
    topic_prefix: String,
    topic_suffix: String,
    hash_tag: bool,
}

impl ChannelNames {
    /// `user_pattern` must contain `{user}` once, `topic_pattern` `{topic}` once (checked by
    /// settings validation; a pattern without the placeholder gets it appended).
    pub fn new(user_pattern: &str, topic_pattern: &str, hash_tag: bool) -> Self {
        let (user_prefix, user_suffix) = split_pattern(user_pattern, "{user}");
        let (topic_prefix, topic_suffix) = split_pattern(topic_pattern, "{topic}");
        Self { user_prefix, user_suffix, topic_prefix, topic_suffix, hash_tag }
    }

    pub fn user(&self, user: &str) -> Arc<str> {
        self.render(&self.user_prefix, user, &self.user_suffix)
    }

    pub fn topic(&self, topic: &str) -> Arc<str> {
        self.render(&self.topic_prefix, topic, &self.topic_suffix)
    }

    fn render(&self, prefix: &str, id: &str, suffix: &str) -> Arc<str> {
        if self.hash_tag { format!("{prefix}{{{id}}}{suffix}").into() } else { format!("{prefix}{id}{suffix}").into() }
    }

    /// Recognises a broker channel name; `None` for a channel this node does not use.
    pub fn parse(&self, channel: &str) -> Option<ChannelKind> {
        if let Some(id) = self.strip(channel, &self.user_prefix, &self.user_suffix) {
            return Some(ChannelKind::User(id.into()));
        }
        self.strip(channel, &self.topic_prefix, &self.topic_suffix).map(|id| ChannelKind::Topic(id.into()))
    }

    fn strip<'a>(&self, channel: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
        let id = channel.strip_prefix(prefix)?.strip_suffix(suffix)?;
        let id = if self.hash_tag { id.strip_prefix('{')?.strip_suffix('}')? } else { id };
        valid_name(id).then_some(id)
    }
}

fn split_pattern(pattern: &str, placeholder: &str) -> (String, String) {
    match pattern.split_once(placeholder) {
        Some((prefix, suffix)) => (prefix.to_owned(), suffix.to_owned()),
        None => (pattern.to_owned(), String::new()),
    }
}

/// User ids and topic names: 1 to 128 bytes of ASCII letters, digits and `_ - . : @ =`.
/// Braces are excluded so that an id can never break a Redis Cluster hash tag, and `*` so a
/// name never looks like a grant pattern.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'='))
}

/// Whether a token's channel grants cover `topic`: an exact name, or `prefix*`.
pub fn granted(grants: &[String], topic: &str) -> bool {
    grants.iter().any(|g| match g.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => g == topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_render_and_parse_back() {
        let names = ChannelNames::new("push:message:{user}", "push:topic:{topic}", false);
        assert_eq!(&*names.user("1"), "push:message:1");
        assert_eq!(names.parse("push:message:1"), Some(ChannelKind::User("1".into())));
        assert_eq!(names.parse("push:topic:news"), Some(ChannelKind::Topic("news".into())));
        assert_eq!(names.parse("other:1"), None);
    }

    #[test]
    fn cluster_mode_wraps_the_id_in_a_hash_tag() {
        let names = ChannelNames::new("push:message:{user}", "t:{topic}:x", true);
        assert_eq!(&*names.user("42"), "push:message:{42}");
        assert_eq!(&*names.topic("news"), "t:{news}:x");
        assert_eq!(names.parse("push:message:{42}"), Some(ChannelKind::User("42".into())));
        assert_eq!(names.parse("push:message:42"), None);
    }

    #[test]
    fn names_reject_braces_wildcards_and_overlong_ids() {
        assert!(valid_name("user-42@example.com"));
        assert!(!valid_name(""));
        assert!(!valid_name("a{b}"));
        assert!(!valid_name("news*"));
        assert!(!valid_name("with space"));
        assert!(!valid_name(&"x".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn grants_match_exact_names_and_prefixes() {
        let grants = vec!["news".to_owned(), "room:*".to_owned()];
        assert!(granted(&grants, "news"));
        assert!(granted(&grants, "room:7"));
        assert!(!granted(&grants, "newsletter"));
        assert!(!granted(&[], "news"));
    }
}
