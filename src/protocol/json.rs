//! The JSON every entry point accepts from outside (publish bodies, broker payloads, stored
//! notifications): well-formed, nested at most [`MAX_DEPTH`] deep, numbers within the range
//! of a double, strings without lone surrogates. What passes can be turned into any JSON value
//! without error, here or in a browser.
//!
//! The check walks the text once without building anything (strings without escapes are not
//! copied), so it is cheap enough for every message.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deepest nesting of arrays and objects accepted.
pub const MAX_DEPTH: usize = 64;

/// Why a JSON text was refused; the message is safe to show the sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

/// Checks `text` against the rules above.
pub fn check(text: &str) -> Result<(), JsonError> {
    let mut de = serde_json::Deserializer::from_str(text);
    Check { depth: 0 }.deserialize(&mut de).map_err(|e| JsonError(e.to_string()))?;
    de.end().map_err(|e| JsonError(e.to_string()))
}

#[derive(Clone, Copy)]
struct Check {
    depth: usize,
}

impl Check {
    fn nested<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(Self { depth: self.depth + 1 })
    }
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    // serde_json refuses numbers beyond a double's range itself ("number out of range").
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    // Escapes are decoded (and lone surrogates refused) before these are called.
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_json_passes() {
        for ok in ["1", "-2.5e10", "\"a\\u00e9\\ud83d\\ude00\"", "null", "[]", r#"{"a":[1,{"b":true}],"c":"d"}"#] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check(&deep), Ok(()));
    }

    #[test]
    fn what_cannot_become_a_value_is_refused() {
        let too_deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(check(&too_deep).unwrap_err().0.contains("nested deeper"));
        let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(5000), "}".repeat(5000));
        assert!(check(&deep_objects).is_err());
        for bad in ["1e400", "-1e400", r#""\ud800""#, r#"{"a":"\udc00x"}"#, "[1,]", "{", "", "1 2", "NaN"] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
