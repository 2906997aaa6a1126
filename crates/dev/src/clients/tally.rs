//! What one client received, and the summary over many (pure, no I/O).

use std::collections::HashMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Longest payload preview in a summary, in characters.
const PREVIEW_CHARS: usize = 80;

/// Ids listed per problem in a summary: enough to look one up, not a dump.
const LISTED_IDS: usize = 20;

/// Frames one client received, with each distinct payload's count so that
/// duplicates can be found.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub text: u64,
    pub binary: u64,
    /// (is binary, payload) → times received.
    pub payloads: HashMap<(bool, Vec<u8>), u32>,
}

impl Tally {
    pub fn record(&mut self, binary: bool, payload: &[u8]) {
        if binary {
            self.binary += 1;
        } else {
            self.text += 1;
        }
        *self.payloads.entry((binary, payload.to_vec())).or_default() += 1;
    }

    pub fn frames(&self) -> u64 {
        self.text + self.binary
    }

    pub fn has_duplicates(&self) -> bool {
        self.payloads.values().any(|&n| n > 1)
    }

    /// How many times this client got `payload` as a text frame.
    pub fn text_count(&self, payload: &str) -> u32 {
        self.payloads
            .get(&(false, payload.as_bytes().to_vec()))
            .copied()
            .unwrap_or(0)
    }

    /// How many times this client got `payload` as a binary frame.
    pub fn binary_count(&self, payload: &[u8]) -> u32 {
        self.payloads
            .get(&(true, payload.to_vec()))
            .copied()
            .unwrap_or(0)
    }
}

/// How one client ended up, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEnd {
    /// Still connected when the summary was taken.
    Live,
    /// Dropped on purpose (no close frame), to leave a stale row.
    Dropped,
    /// The gateway closed it (DELETE @connections, shutdown) or it failed.
    ClosedByPeer,
}

/// One payload and how many clients got it (at least once).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadSeen {
    /// The text (cut to 80 characters), or `base64:` and the bytes' start.
    pub preview: String,
    pub binary: bool,
    pub bytes: usize,
    pub clients: usize,
}

/// The JSON summary `fanout clients` prints on exit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Clients opened.
    pub clients: usize,
    /// Clients still connected at the end.
    pub live: usize,
    /// Clients dropped on purpose.
    pub dropped: usize,
    /// Clients closed by the other side before the end.
    pub closed_by_peer: usize,
    /// Frames received by all clients, whatever their fate.
    pub frames: u64,
    pub text_frames: u64,
    pub binary_frames: u64,
    /// Fewest frames any client that was not dropped received.
    pub min_per_client: u64,
    /// Most frames any client received.
    pub max_per_client: u64,
    /// Clients (not dropped) that received nothing.
    pub clients_with_nothing: usize,
    /// Clients that received some payload more than once.
    pub clients_with_duplicates: usize,
    /// Up to 20 ids of each kind of problem.
    pub nothing_ids: Vec<String>,
    pub duplicate_ids: Vec<String>,
    /// Each distinct payload, most widely received first.
    pub payloads: Vec<PayloadSeen>,
    /// `--expect-frames`: frames each client that was not dropped should
    /// have received exactly once each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_frames: Option<u64>,
    /// Whether every such client got exactly that many, without duplicates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
}

/// Summarises clients given as (id, fate, tally).
pub fn summarise<'a>(
    clients: impl IntoIterator<Item = (&'a str, ClientEnd, &'a Tally)>,
    expect_frames: Option<u64>,
) -> Summary {
    let mut summary = Summary {
        expect_frames,
        min_per_client: u64::MAX,
        ..Summary::default()
    };
    let mut payloads: HashMap<&(bool, Vec<u8>), usize> = HashMap::new();
    let mut all_as_expected = true;
    for (id, fate, tally) in clients {
        summary.clients += 1;
        match fate {
            ClientEnd::Live => summary.live += 1,
            ClientEnd::Dropped => summary.dropped += 1,
            ClientEnd::ClosedByPeer => summary.closed_by_peer += 1,
        }
        summary.text_frames += tally.text;
        summary.binary_frames += tally.binary;
        summary.max_per_client = summary.max_per_client.max(tally.frames());
        for key in tally.payloads.keys() {
            *payloads.entry(key).or_default() += 1;
        }
        if tally.has_duplicates() {
            summary.clients_with_duplicates += 1;
            push_listed(&mut summary.duplicate_ids, id);
        }
        if fate == ClientEnd::Dropped {
            continue;
        }
        summary.min_per_client = summary.min_per_client.min(tally.frames());
        if tally.frames() == 0 {
            summary.clients_with_nothing += 1;
            push_listed(&mut summary.nothing_ids, id);
        }
        if let Some(expected) = expect_frames {
            all_as_expected &= tally.frames() == expected && !tally.has_duplicates();
        }
    }
    summary.frames = summary.text_frames + summary.binary_frames;
    if summary.min_per_client == u64::MAX {
        summary.min_per_client = 0;
    }
    summary.ok = expect_frames.map(|_| all_as_expected);
    let mut seen: Vec<PayloadSeen> = payloads
        .into_iter()
        .map(|((binary, bytes), clients)| PayloadSeen {
            preview: preview(*binary, bytes),
            binary: *binary,
            bytes: bytes.len(),
            clients,
        })
        .collect();
    seen.sort_by(|a, b| {
        b.clients
            .cmp(&a.clients)
            .then_with(|| a.preview.cmp(&b.preview))
    });
    summary.payloads = seen;
    summary
}

fn push_listed(ids: &mut Vec<String>, id: &str) {
    if ids.len() < LISTED_IDS {
        ids.push(id.to_owned());
    }
}

fn preview(binary: bool, bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !binary => text.chars().take(PREVIEW_CHARS).collect(),
        _ => {
            let head = &bytes[..bytes.len().min(PREVIEW_CHARS * 3 / 4)];
            format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(head)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(frames: &[(bool, &[u8])]) -> Tally {
        let mut t = Tally::default();
        for (binary, payload) in frames {
            t.record(*binary, payload);
        }
        t
    }

    #[test]
    fn counts_text_and_binary_and_finds_duplicates() {
        let t = tally(&[(false, b"a"), (true, b"\xff"), (false, b"a")]);
        assert_eq!((t.text, t.binary, t.frames()), (2, 1, 3));
        assert!(t.has_duplicates());
        assert_eq!(t.text_count("a"), 2);
        assert_eq!(t.binary_count(b"\xff"), 1);
        // The same bytes as text and as binary are different frames.
        let t = tally(&[(false, b"a"), (true, b"a")]);
        assert!(!t.has_duplicates());
    }

    #[test]
    fn summary_over_live_dropped_and_duplicate_clients() {
        let once = tally(&[(false, b"hello"), (true, &[0, 1])]);
        let twice = tally(&[(false, b"hello"), (false, b"hello")]);
        let nothing = Tally::default();
        let summary = summarise(
            [
                ("a", ClientEnd::Live, &once),
                ("b", ClientEnd::Live, &twice),
                ("c", ClientEnd::Live, &nothing),
                ("d", ClientEnd::Dropped, &nothing),
            ],
            Some(2),
        );
        assert_eq!((summary.clients, summary.live, summary.dropped), (4, 3, 1));
        assert_eq!(
            (summary.frames, summary.text_frames, summary.binary_frames),
            (4, 3, 1)
        );
        assert_eq!((summary.min_per_client, summary.max_per_client), (0, 2));
        assert_eq!(summary.clients_with_nothing, 1);
        assert_eq!(summary.nothing_ids, ["c"]);
        assert_eq!(summary.duplicate_ids, ["b"]);
        assert_eq!(summary.ok, Some(false));
        assert_eq!(summary.payloads[0].preview, "hello");
        assert_eq!(summary.payloads[0].clients, 2);
        assert_eq!(summary.payloads[1].preview, "base64:AAE=");
    }

    #[test]
    fn ok_when_every_remaining_client_got_exactly_the_expected() {
        let one = tally(&[(false, b"x")]);
        let summary = summarise(
            [
                ("a", ClientEnd::Live, &one),
                ("b", ClientEnd::Dropped, &Tally::default()),
            ],
            Some(1),
        );
        assert_eq!(summary.ok, Some(true));
        assert_eq!(summarise([("a", ClientEnd::Live, &one)], None).ok, None);
    }
}
