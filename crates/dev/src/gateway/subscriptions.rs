//! The client's messages in the memberships layout, and who may join what:
//! the same rule as the subscribe route of the template's own WebSocket
//! API (`CreateWebSocketApi`), so a client that works against this
//! stand-in works against the stack.
//!
//! A channel is open to a connection when it is a string of 1 to 256
//! UTF-16 units (Java's `String.length()`, which the templates call) that
//! starts with the public prefix (`--public-channel-prefix`, the template's
//! `PublicChannelPrefix`) or with the authorizer's `channelPrefix` (here
//! the connect URL's `?channelPrefix=`). An empty prefix opens nothing.

use serde_json::Value;

/// The longest channel name the rule opens, in UTF-16 units.
pub const MAX_CHANNEL_UNITS: usize = 256;

/// A text frame, as the API's route selection (`$request.body.action`)
/// and the routes' templates read it.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// `{"action":"whoami"}`: the stand-in's own, answered with the id.
    Whoami,
    /// `{"action":"subscribe","channel":NAME}` with NAME a JSON string.
    Subscribe(String),
    /// `{"action":"unsubscribe","channel":NAME}` with NAME a JSON string.
    Unsubscribe(String),
    /// Anything else (the `$default` route), or a subscribe or unsubscribe
    /// whose channel is not a string: nothing is written.
    Other,
}

/// Reads one text frame.
pub fn action(text: &str) -> Action {
    let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(text) else {
        return Action::Other;
    };
    let channel = || match doc.get("channel") {
        Some(Value::String(name)) if !name.is_empty() => Some(name.clone()),
        _ => None,
    };
    match doc.get("action").and_then(Value::as_str) {
        Some("whoami") => Action::Whoami,
        Some("subscribe") => channel().map_or(Action::Other, Action::Subscribe),
        Some("unsubscribe") => channel().map_or(Action::Other, Action::Unsubscribe),
        _ => Action::Other,
    }
}

/// Whether `channel` is open to a connection whose authorizer gave
/// `authorizer_prefix`.
pub fn opens(channel: &str, public_prefix: &str, authorizer_prefix: Option<&str>) -> bool {
    let units = channel.encode_utf16().count();
    if units == 0 || units > MAX_CHANNEL_UNITS {
        return false;
    }
    let under = |prefix: &str| !prefix.is_empty() && channel.starts_with(prefix);
    under(public_prefix) || authorizer_prefix.is_some_and(under)
}

/// Whether an unsubscribe names a channel the templates would delete (any
/// string of 1 to 256 units: only the connection's own rows can go).
pub fn fits(channel: &str) -> bool {
    (1..=MAX_CHANNEL_UNITS).contains(&channel.encode_utf16().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_as_the_routes_read_them() {
        let cases = [
            (r#"{"action":"whoami"}"#, Action::Whoami),
            (
                r#"{"action":"subscribe","channel":"public.a"}"#,
                Action::Subscribe("public.a".into()),
            ),
            (
                r#"{"channel":"x\"y","action":"unsubscribe"}"#,
                Action::Unsubscribe("x\"y".into()),
            ),
            (r#"{"action":"subscribe","channel":42}"#, Action::Other),
            (
                r#"{"action":"subscribe","channel":{"S":"a"}}"#,
                Action::Other,
            ),
            (r#"{"action":"subscribe","channel":["a"]}"#, Action::Other),
            (r#"{"action":"subscribe","channel":null}"#, Action::Other),
            (r#"{"action":"subscribe","channel":""}"#, Action::Other),
            (r#"{"action":"subscribe"}"#, Action::Other),
            (r#"{"action":"ping"}"#, Action::Other),
            ("subscribe", Action::Other),
            ("[1]", Action::Other),
        ];
        for (text, want) in cases {
            assert_eq!(action(text), want, "{text}");
        }
    }

    #[test]
    fn the_rule_opens_public_and_own_channels_only() {
        let long = format!("public.{}", "x".repeat(249));
        let too_long = format!("public.{}", "x".repeat(250));
        // 7 + 2 × 125 = 257 UTF-16 units in 132 chars.
        let astral = format!("public.{}", "🙂".repeat(125));
        let cases: [(&str, &str, Option<&str>, bool); 11] = [
            ("public.lobby", "public.", None, true),
            ("lobby", "public.", None, false),
            ("admin", "public.", Some("user.alice."), false),
            ("user.alice.inbox", "public.", Some("user.alice."), true),
            ("user.bob.inbox", "public.", Some("user.alice."), false),
            ("anything", "", None, false),
            ("anything", "", Some(""), false),
            ("", "", None, false),
            (&long, "public.", None, true),
            (&too_long, "public.", None, false),
            (&astral, "public.", None, false),
        ];
        for (channel, public, prefix, want) in cases {
            assert_eq!(
                opens(channel, public, prefix),
                want,
                "{channel:.40} {prefix:?}"
            );
        }
        assert!(fits("x") && !fits("") && !fits(&too_long));
    }
}
