//! Property tests: every parser that takes outside input (client frames, publish bodies, broker
//! payloads, ids, tokens, Origin, Sec-WebSocket-Key, JSON itself) answers arbitrary bytes and
//! arbitrary JSON with a classified result and never panics; and what the node writes to a
//! JSON session always parses.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use pushnode::api::PublishRequest;
use pushnode::auth::Authenticator;
use pushnode::channel::{ChannelKind, ChannelNames, valid_name};
use pushnode::gateway::valid_websocket_key;
use pushnode::protocol::{ClientFrame, Delivery, Format, NoteId, WireFrame, json};
use serde_json::Value;

const SECRET: &str = "property-secret-property-secret!";

/// Arbitrary JSON values, nested a few levels, with awkward strings and numbers.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text that is JSON-ish: arbitrary JSON, JSON with a known frame type, or noise around it.
fn json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        json_value().prop_map(|v| v.to_string()),
        (prop_oneof![Just("subscribe"), Just("unsubscribe"), Just("ping"), Just("read"), Just("x")], json_value())
            .prop_map(|(t, v)| format!(r#"{{"type":"{t}","channel":{v},"ids":{v},"up_to":{v},"all":{v}}}"#)),
        (0usize..200).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n))),
        ".{0,64}",
        r#"[\[\]{}",:0-9eE.+\-a-z\\ ]{0,64}"#,
    ]
}

fn authenticator() -> Authenticator {
    Authenticator::new(&pushnode::settings::Auth {
        jwt_secret: SECRET.into(),
        allowed_origins: vec!["https://app.example".into()],
        ..Default::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn json_check_accepts_only_what_becomes_a_value(text in json_text()) {
        if json::check(&text).is_ok() {
            prop_assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn client_frames_are_decoded_or_refused(text in json_text()) {
        let _ = ClientFrame::decode(&text);
    }

    #[test]
    fn publish_bodies_are_parsed_or_refused_with_a_4xx(text in json_text(), data in json_text()) {
        for body in [text.clone(), format!(r#"{{"user":"1","data":{data}}}"#)] {
            if let Err(e) = PublishRequest::parse(body.as_bytes()) {
                prop_assert!(e.status().is_client_error());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_break_a_parser(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = PublishRequest::parse(&bytes);
        let _ = ClientFrame::decode(&text);
        let _ = text.parse::<NoteId>();
        let _ = authenticator().verify(&text);
        let _ = authenticator().check_origin(std::iter::once(bytes.as_slice()));
        let _ = valid_websocket_key(&bytes);
        let _ = json::check(&text);
    }

    #[test]
    fn note_ids_round_trip_within_their_bounds(text in "[0-9]{0,18}-[0-9]{0,18}|.{0,20}") {
        if let Ok(id) = text.parse::<NoteId>() {
            prop_assert!(id.ms <= NoteId::MAX_PART && id.seq <= NoteId::MAX_PART);
            prop_assert_eq!(id.to_string().parse::<NoteId>(), Ok(id));
        }
    }

    /// Whatever arrives on a broker channel, a JSON session only ever gets a frame that parses.
    #[test]
    fn broker_payloads_become_frames_that_parse(
        payload in prop_oneof![
            json_text().prop_map(|t| t.into_bytes()),
            json_value().prop_map(|v| format!(r#"{{"pushnode":1,"id":"a","ts":1,"persisted":true,"unread":2,"data":{v}}}"#).into_bytes()),
            json_text().prop_map(|t| format!(r#"{{"pushnode":1,"id":"a","ts":1,"data":{t}}}"#).into_bytes()),
            json_text().prop_map(|t| format!(r#"{{"event":"E","data":{t},"socket":null}}"#).into_bytes()),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
        topic in prop::option::of("[a-z]{1,8}"),
    ) {
        let topic = topic.map(|t| Arc::<str>::from(t.as_str()));
        let delivery = Delivery::decode(&Bytes::from(payload), topic.as_ref());
        if let Some(WireFrame::Text(text)) = delivery.frame(Format::Json, &|| "id".to_owned()) {
            let frame: Value = serde_json::from_str(text).unwrap();
            prop_assert!(frame["type"] == "notification" || frame["type"] == "unread", "{frame}");
        }
        let _ = delivery.frame(Format::Raw, &|| "id".to_owned());
    }

    /// Signed tokens with arbitrary claims: accepted only with a valid user, never a panic.
    #[test]
    fn signed_tokens_with_arbitrary_claims_are_classified(claims in json_value(), sub in json_value()) {
        let mut claims = claims;
        if let Value::Object(map) = &mut claims {
            map.insert("sub".into(), sub);
            map.insert("exp".into(), Value::from(4_000_000_000u64));
        }
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        );
        if let Ok(token) = token && let Ok(identity) = authenticator().verify(&token) {
            prop_assert!(valid_name(&identity.user));
        }
    }

    /// `ChannelNames::overlap` finds a shared channel exactly when one exists.
    #[test]
    fn channel_overlap_matches_a_brute_force_search(
        user_prefix in "[a:#]{0,2}", user_suffix in "[a:#]{0,2}",
        topic_prefix in "[a:#]{0,2}", topic_suffix in "[a:#]{0,2}",
        cluster in any::<bool>(),
    ) {
        let names = ChannelNames::new(
            &format!("{user_prefix}{{user}}{user_suffix}"),
            &format!("{topic_prefix}{{topic}}{topic_suffix}"),
            cluster,
        );
        // Every user id of up to 5 bytes over the bytes that matter.
        let mut ids = vec![String::new()];
        let mut found = None;
        for _ in 0..5 {
            ids = ids.iter().flat_map(|id| ["a", "x", ":"].map(|b| format!("{id}{b}"))).collect();
            for user in &ids {
                let channel = names.user(user);
                let as_topic = topic_of(&names, &channel, &topic_prefix, &topic_suffix, cluster);
                if let Some(topic) = as_topic && found.is_none() {
                    found = Some((user.clone(), topic));
                }
            }
        }
        let overlap = names.overlap();
        prop_assert_eq!(overlap.is_some(), found.is_some(), "{:?} vs brute force {:?}", overlap, found);
        if let Some(o) = overlap {
            prop_assert_eq!(&*names.user(&o.user), &*names.topic(&o.topic));
            prop_assert!(matches!(names.parse(&o.channel), Some(ChannelKind::User(_))));
        }
    }
}

/// The topic name whose channel is `channel`, if there is one.
fn topic_of(_: &ChannelNames, channel: &str, prefix: &str, suffix: &str, cluster: bool) -> Option<String> {
    let id = channel.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let id = if cluster { id.strip_prefix('{')?.strip_suffix('}')? } else { id };
    valid_name(id).then(|| id.to_owned())
}

#[test]
fn tokens_issued_for_a_valid_user_verify() {
    let auth = authenticator();
    let token = auth.issue("u-1", Duration::from_secs(60), vec![]).unwrap();
    assert_eq!(auth.verify(&token).unwrap().user.as_ref(), "u-1");
}
