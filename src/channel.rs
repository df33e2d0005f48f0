//! Channel naming: how a user id or a topic name becomes the broker channel that carries its
//! messages, and which names are acceptable at all.
//!
//! The rule (documented in the README): `broker.user_channel` and `broker.topic_channel` are
//! patterns in which `{user}` / `{topic}` stand for the id. In `redis-cluster` mode the id is
//! wrapped in a hash tag (`push:message:{42}`), so all keys of one user share a slot.

use std::sync::Arc;

/// The name length limit, as a literal so [`NAME_RULE`]'s wording is built from it at compile
/// time.
macro_rules! max_name_len {
    () => {
        128
    };
}

/// Longest user id or topic name accepted, in bytes.
pub const MAX_NAME_LEN: usize = max_name_len!();

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

    /// Whether some topic name renders to the same broker channel as some user id. Names are
    /// `1..=MAX_NAME_LEN` bytes of the [`valid_name`] alphabet. `None` when no pair exists;
    /// otherwise one such pair, as proof.
    ///
    /// For each possible channel length, every byte of the channel is either fixed by both
    /// patterns (they must agree), fixed by one and inside the other's id (it must be a name
    /// byte), or inside both ids (any name byte will do). A length where every byte can be
    /// satisfied gives the pair. At most `MAX_NAME_LEN` lengths of at most a few hundred bytes
    /// are tried: this runs once, at start.
    pub fn overlap(&self) -> Option<Overlap> {
        let (user_prefix, user_suffix) = self.effective(&self.user_prefix, &self.user_suffix);
        let (topic_prefix, topic_suffix) = self.effective(&self.topic_prefix, &self.topic_suffix);
        let user = Shape { prefix: user_prefix.as_bytes(), suffix: user_suffix.as_bytes() };
        let topic = Shape { prefix: topic_prefix.as_bytes(), suffix: topic_suffix.as_bytes() };
        let lengths = user.lengths().start.max(topic.lengths().start)..user.lengths().end.min(topic.lengths().end);
        for len in lengths {
            let channel: Option<Vec<u8>> = (0..len)
                .map(|i| match (user.fixed(i, len), topic.fixed(i, len)) {
                    (Some(a), Some(b)) => (a == b).then_some(a),
                    (Some(a), None) | (None, Some(a)) => name_byte(a).then_some(a),
                    (None, None) => Some(b'a'),
                })
                .collect();
            let Some(channel) = channel else { continue };
            let id = |shape: &Shape<'_>| {
                String::from_utf8_lossy(&channel[shape.prefix.len()..len - shape.suffix.len()]).into_owned()
            };
            let (user_id, topic_id) = (id(&user), id(&topic));
            let rendered = self.user(&user_id);
            if valid_name(&user_id) && valid_name(&topic_id) && *rendered == *self.topic(&topic_id) {
                return Some(Overlap { user: user_id, topic: topic_id, channel: rendered.to_string() });
            }
        }
        None
    }

    /// The literal text around an id once rendered (with the hash tag's braces in cluster mode).
    fn effective(&self, prefix: &str, suffix: &str) -> (String, String) {
        if self.hash_tag {
            (format!("{prefix}{{"), format!("}}{suffix}"))
        } else {
            (prefix.to_owned(), suffix.to_owned())
        }
    }

    fn strip<'a>(&self, channel: &'a str, prefix: &str, suffix: &str) -> Option<&'a str> {
        let id = channel.strip_prefix(prefix)?.strip_suffix(suffix)?;
        let id = if self.hash_tag { id.strip_prefix('{')?.strip_suffix('}')? } else { id };
        valid_name(id).then_some(id)
    }
}

/// The fixed text around an id, as bytes.
struct Shape<'a> {
    prefix: &'a [u8],
    suffix: &'a [u8],
}

impl Shape<'_> {
    /// Channel lengths this shape can render (ids of 1 to `MAX_NAME_LEN` bytes).
    fn lengths(&self) -> std::ops::Range<usize> {
        let fixed = self.prefix.len() + self.suffix.len();
        fixed + 1..fixed + MAX_NAME_LEN + 1
    }

    /// The byte this shape fixes at `i` in a channel of `len` bytes; `None` inside the id.
    fn fixed(&self, i: usize, len: usize) -> Option<u8> {
        if i < self.prefix.len() {
            Some(self.prefix[i])
        } else if i >= len - self.suffix.len() {
            Some(self.suffix[i - (len - self.suffix.len())])
        } else {
            None
        }
    }
}

/// A user id and a topic name whose broker channels are the same (see [`ChannelNames::overlap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub user: String,
    pub topic: String,
    pub channel: String,
}

fn split_pattern(pattern: &str, placeholder: &str) -> (String, String) {
    match pattern.split_once(placeholder) {
        Some((prefix, suffix)) => (prefix.to_owned(), suffix.to_owned()),
        None => (pattern.to_owned(), String::new()),
    }
}

/// User ids and topic names: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits and
/// `_ - . : @ =`.
/// Braces are excluded so that an id can never break a Redis Cluster hash tag, and `*` so a
/// name never looks like a grant pattern.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.bytes().all(name_byte)
}

/// The rule's wording for error messages, kept beside the rule.
pub const NAME_RULE: &str = concat!("1 to ", max_name_len!(), " of A-Z a-z 0-9 _ - . : @ =");

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'=')
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
    fn overlapping_patterns_are_found_with_a_witness() {
        // The attack from the issue: a topic that renders to another user's channel.
        let names = ChannelNames::new("push:message:{user}", "push:{topic}", false);
        let o = names.overlap().expect("push:{topic} covers push:message:{user}");
        assert_eq!(&*names.topic(&o.topic), &*names.user(&o.user));
        assert!(o.topic.starts_with("message:"));
        // Laravel-style: one prefix for everything.
        let laravel = ChannelNames::new("app_private-App.Models.User.{user}", "app_{topic}", false);
        assert!(laravel.overlap().is_some());
        // A suffix can overlap as well as a prefix, and fixed text can overlap fixed text.
        assert!(ChannelNames::new(":#{user}", "{topic}#:", false).overlap().is_some());
        assert!(ChannelNames::new("{user}:inbox", "{topic}", false).overlap().is_some());
        assert!(ChannelNames::new("u.{user}", "{topic}.x", false).overlap().is_some());
        // Distinct fixed text, or a byte no name may hold, keeps them apart.
        assert_eq!(ChannelNames::new("pushnode:user:{user}", "pushnode:topic:{topic}", false).overlap(), None);
        assert_eq!(ChannelNames::new("u#{user}", "{topic}", false).overlap(), None);
        assert_eq!(ChannelNames::new("x{user}", "y{topic}", false).overlap(), None);
        // In cluster mode the hash tag's braces are part of the channel and no name holds them.
        assert_eq!(ChannelNames::new("push:message:{user}", "push:{topic}", true).overlap(), None);
        assert!(ChannelNames::new("p:{user}", "p:{topic}", true).overlap().is_some());
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
