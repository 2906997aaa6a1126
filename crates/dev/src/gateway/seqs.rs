//! What each sink id held, and since when: for payloads that carry a
//! version (a JSON object with a numeric `seq`, as a stream of updates to
//! one value does), the sink keeps per id the moments its highest `seq`
//! went up. `GET /{stage}/@stats/seqs` returns them; [`Staleness`] turns
//! them, with the time each `seq` was sent, into how stale the audience
//! was.
//!
//! A client is taken to keep the newest value it has been given (an older
//! one arriving late does not replace it), so only the rises are kept:
//! memory grows with the updates each id gets, at most one entry a post.

use std::collections::BTreeMap;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

/// One id's record: the posts that carried a `seq`, and each rise of the
/// highest `seq` it has had, in the order they came.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Posts with a `seq`, whether or not it was newer than what the id had.
    pub received: u32,
    /// `[seq, ms since the Unix epoch]` each time the highest `seq` rose.
    pub raised: Vec<(u64, u64)>,
}

impl Held {
    /// The rises up to `at_ms`.
    fn rises_until(&self, at_ms: u64) -> &[(u64, u64)] {
        let until = self.raised.partition_point(|&(_, ms)| ms <= at_ms);
        &self.raised[..until]
    }
}

/// `GET /{stage}/@stats/seqs`: every sink id that has had a `seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqSnapshot {
    pub ids: BTreeMap<String, Held>,
}

/// The sink's per-id records, shared by the POST handlers.
#[derive(Debug, Default)]
pub struct SeqLog {
    ids: DashMap<String, Held>,
}

/// A cheap summary for polling, beside the other counters in `@stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqSummary {
    /// Ids that have had a `seq`.
    pub ids: u64,
    /// The highest `seq` any id has had.
    pub newest: u64,
    /// Ids that hold that one.
    pub holding_newest: u64,
}

impl SeqLog {
    /// Records a post to `id` at `at_ms` if its body carries a `seq`.
    pub fn record(&self, id: &str, body: &[u8], at_ms: u64) {
        let Some(seq) = seq_of(body) else {
            return;
        };
        let mut held = self.ids.entry(id.to_owned()).or_default();
        held.received = held.received.saturating_add(1);
        match held.raised.last() {
            Some(&(top, _)) if seq <= top => {}
            // Two posts to one id read the clock before taking its entry:
            // the later rise is never recorded as earlier.
            last => {
                let at_ms = last.map_or(at_ms, |&(_, before)| at_ms.max(before));
                held.raised.push((seq, at_ms));
            }
        }
    }

    pub fn snapshot(&self) -> SeqSnapshot {
        SeqSnapshot {
            ids: self
                .ids
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect(),
        }
    }

    pub fn summary(&self) -> SeqSummary {
        let top = |held: &Held| held.raised.last().map_or(0, |&(seq, _)| seq);
        let newest = self.ids.iter().map(|e| top(e.value())).max().unwrap_or(0);
        SeqSummary {
            ids: self.ids.len() as u64,
            newest,
            holding_newest: self.ids.iter().filter(|e| top(e.value()) == newest).count() as u64,
        }
    }
}

/// The `seq` of a body that is a JSON object with a whole-number `seq`.
/// Anything else (text, an object without one) is no update; a body that
/// does not start with `{` is not parsed at all, so other payloads cost a
/// byte's look.
pub fn seq_of(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Versioned {
        seq: u64,
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice::<Versioned>(body)
        .ok()
        .map(|v| v.seq)
}

/// How stale an audience was over a stream of updates, from the endpoint's
/// side. The newest value at a moment is the highest `seq` sent (to the
/// queue) by then; an id holds what it has had (its highest `seq`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Staleness {
    pub connections: u64,
    /// Ids whose longest stretch without the then-newest value (from a
    /// newer `seq`'s send to the id holding the newest again, or to the
    /// end) was over the threshold.
    pub stale_over: u64,
    /// Ids that at some moment had not had, for over the threshold, a
    /// value sent that long ago: an update that did not reach the id
    /// (nor a newer one) within the threshold of its send.
    pub behind_over: u64,
    /// Ids that had no update at all by the end.
    pub no_update: u64,
    /// Ids holding the last `seq` at the end.
    pub have_last: u64,
    /// From the last `seq`'s send to the moment the last id had it (or a
    /// newer one); `None` if some id did not by the end.
    pub last_to_all_ms: Option<u64>,
    /// Median and most of each id's longest stale stretch, and of its
    /// longest wait for a value sent (the two above, in ms).
    pub stale_median_ms: u64,
    pub stale_max_ms: u64,
    pub behind_median_ms: u64,
    pub behind_max_ms: u64,
    /// Median of the rises each id had: how many newer values reached it.
    pub updates_median: u64,
    /// Where in the audience's order (as given) the ids that never waited
    /// over the threshold are: the first and the last of them.
    pub kept_up_span: Option<(usize, usize)>,
}

/// One id's figures.
#[derive(Debug, PartialEq, Eq)]
struct One {
    stale_ms: u64,
    behind_ms: u64,
    /// When it first held the last `seq`.
    last_at: Option<u64>,
    updates: u64,
}

impl Staleness {
    /// `sent`: each update's `seq` and send time (ms since the Unix epoch),
    /// oldest first, `seq` and time rising; `ids`: the audience; `log`: what
    /// the sink recorded; posts after `end_ms` are left out. Stretches over
    /// `over_ms` count.
    pub fn measure<'a>(
        sent: &[(u64, u64)],
        ids: impl IntoIterator<Item = &'a str>,
        log: &SeqSnapshot,
        end_ms: u64,
        over_ms: u64,
    ) -> Self {
        let none = Held::default();
        let ones: Vec<One> = ids
            .into_iter()
            .map(|id| one(sent, log.ids.get(id).unwrap_or(&none), end_ms))
            .collect();
        let median_max = |field: fn(&One) -> u64| {
            let mut values: Vec<u64> = ones.iter().map(field).collect();
            values.sort_unstable();
            (
                values.get(values.len() / 2).copied().unwrap_or(0),
                values.last().copied().unwrap_or(0),
            )
        };
        let count = |keep: &dyn Fn(&One) -> bool| ones.iter().filter(|o| keep(o)).count() as u64;
        let (stale_median_ms, stale_max_ms) = median_max(|o| o.stale_ms);
        let (behind_median_ms, behind_max_ms) = median_max(|o| o.behind_ms);
        let last_sent = sent.last().map_or(0, |&(_, ms)| ms);
        let last_to_all_ms = ones
            .iter()
            .map(|o| o.last_at.map(|at| at.saturating_sub(last_sent)))
            .try_fold(0, |most, wait| wait.map(|w| w.max(most)));
        Self {
            connections: ones.len() as u64,
            stale_over: count(&|o| o.stale_ms > over_ms),
            behind_over: count(&|o| o.behind_ms > over_ms),
            no_update: count(&|o| o.updates == 0),
            have_last: count(&|o| o.last_at.is_some()),
            last_to_all_ms,
            stale_median_ms,
            stale_max_ms,
            behind_median_ms,
            behind_max_ms,
            updates_median: median_max(|o| o.updates).0,
            kept_up_span: ones
                .iter()
                .position(|o| o.behind_ms <= over_ms)
                .zip(ones.iter().rposition(|o| o.behind_ms <= over_ms)),
        }
    }
}

fn one(sent: &[(u64, u64)], held: &Held, end_ms: u64) -> One {
    let raised = held.rises_until(end_ms);
    let last_seq = sent.last().map_or(0, |&(seq, _)| seq);
    One {
        stale_ms: longest_stale(sent, raised, end_ms),
        behind_ms: longest_behind(sent, raised, end_ms),
        last_at: raised
            .iter()
            .find(|&&(seq, _)| seq >= last_seq)
            .map(|&(_, at)| at),
        updates: raised.len() as u64,
    }
}

/// The longest stretch in which the id's highest `seq` was below the
/// highest sent: the two step functions walked together in time.
fn longest_stale(sent: &[(u64, u64)], raised: &[(u64, u64)], end_ms: u64) -> u64 {
    let (mut newest, mut held) = (0, 0);
    let (mut s, mut r) = (0, 0);
    let mut since: Option<u64> = None;
    let mut longest = 0;
    loop {
        // A send and a rise in the same ms: the send first, so a value
        // that arrives in the ms it was sent is not counted as stale.
        let send_first = match (sent.get(s), raised.get(r)) {
            (None, None) => break,
            (Some(&(_, sent_at)), Some(&(_, risen_at))) => sent_at <= risen_at,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        let at = if send_first {
            let (seq, at) = sent[s];
            newest = newest.max(seq);
            s += 1;
            at
        } else {
            let (seq, at) = raised[r];
            held = held.max(seq);
            r += 1;
            at
        };
        match (held < newest, since) {
            (true, None) => since = Some(at),
            (false, Some(from)) => {
                longest = longest.max(at.saturating_sub(from));
                since = None;
            }
            _ => {}
        }
    }
    since.map_or(longest, |from| longest.max(end_ms.saturating_sub(from)))
}

/// The longest time a value sent went without reaching the id (neither it
/// nor a newer one): at each rise, the wait of the oldest value it brought
/// the id, and at the end, that of the oldest value it never had.
fn longest_behind(sent: &[(u64, u64)], raised: &[(u64, u64)], end_ms: u64) -> u64 {
    // The send time of the first update newer than `held`, if any was sent.
    let first_newer = |held: u64| {
        let index = sent.partition_point(|&(seq, _)| seq <= held);
        sent.get(index).map(|&(_, at)| at)
    };
    let mut held = 0;
    let mut longest = 0;
    for &(seq, at) in raised {
        if let Some(sent_at) = first_newer(held) {
            longest = longest.max(at.saturating_sub(sent_at));
        }
        held = held.max(seq);
    }
    if let Some(sent_at) = first_newer(held) {
        longest = longest.max(end_ms.saturating_sub(sent_at));
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Updates 1..=n sent every 100 ms from t = 1,000.
    fn every_100_ms(n: u64) -> Vec<(u64, u64)> {
        (1..=n).map(|seq| (seq, 900 + 100 * seq)).collect()
    }

    fn held(raised: &[(u64, u64)]) -> Held {
        Held {
            received: raised.len() as u32,
            raised: raised.to_vec(),
        }
    }

    #[test]
    fn a_seq_is_a_whole_number_in_an_object() {
        assert_eq!(seq_of(br#"{"seq": 17, "score": "2-1"}"#), Some(17));
        assert_eq!(seq_of(b"  {\"seq\":0}"), Some(0));
        for other in [
            &b"hi"[..],
            b"17",
            br#"{"seq": -1}"#,
            br#"{"seq": 1.5}"#,
            br#"{"seq": "3"}"#,
            br#"{"score": 1}"#,
            br#"[{"seq": 1}]"#,
            b"{not json",
            b"",
        ] {
            assert_eq!(seq_of(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn only_rises_are_kept_and_every_update_is_counted() {
        let log = SeqLog::default();
        for (seq, at) in [(2, 10), (1, 11), (2, 12), (5, 13), (4, 14)] {
            log.record("c-1", format!(r#"{{"seq":{seq}}}"#).as_bytes(), at);
        }
        log.record("c-1", b"hi", 15);
        log.record("c-2", br#"{"seq":5}"#, 16);
        log.record("c-3", b"no seq", 17);
        let snapshot = log.snapshot();
        assert_eq!(snapshot.ids.len(), 2, "an id without a seq is not listed");
        assert_eq!(
            snapshot.ids["c-1"],
            Held {
                received: 5,
                raised: vec![(2, 10), (5, 13)]
            }
        );
        assert_eq!(
            log.summary(),
            SeqSummary {
                ids: 2,
                newest: 5,
                holding_newest: 2
            }
        );
    }

    #[test]
    fn a_later_rise_is_never_recorded_as_earlier() {
        let log = SeqLog::default();
        log.record("c-1", br#"{"seq":5}"#, 16);
        log.record("c-1", br#"{"seq":6}"#, 15);
        assert_eq!(log.snapshot().ids["c-1"].raised, vec![(5, 16), (6, 16)]);
    }

    #[test]
    fn a_connection_that_keeps_up_is_stale_only_between_a_send_and_its_arrival() {
        let sent = every_100_ms(3);
        // Each arrives 20 ms after its send; the last at 1,220.
        let raised = [(1, 1020), (2, 1120), (3, 1220)];
        assert_eq!(longest_stale(&sent, &raised, 5000), 20);
        assert_eq!(longest_behind(&sent, &raised, 5000), 20);
    }

    #[test]
    fn one_behind_all_along_is_stale_all_along_but_never_long_behind() {
        // Each value arrives 150 ms after its send: the newer one is always
        // out by then, so the id never holds the newest until the last.
        let sent = every_100_ms(4);
        let raised = [(1, 1150), (2, 1250), (3, 1350), (4, 1450)];
        assert_eq!(longest_stale(&sent, &raised, 5000), 450, "1,000 to 1,450");
        assert_eq!(longest_behind(&sent, &raised, 5000), 150);
    }

    #[test]
    fn a_value_that_skips_older_ones_ends_the_wait_of_all_of_them() {
        let sent = every_100_ms(5);
        // Gets 1 at once, then 5 at 3,000: 2 was sent at 1,100.
        let raised = [(1, 1000), (5, 3000)];
        assert_eq!(longest_stale(&sent, &raised, 9000), 1900);
        assert_eq!(longest_behind(&sent, &raised, 9000), 1900);
    }

    #[test]
    fn a_connection_without_the_last_value_is_stale_to_the_end() {
        let sent = every_100_ms(3);
        let raised = [(1, 1000), (2, 1100)];
        // 3 was sent at 1,200 and never came.
        assert_eq!(longest_stale(&sent, &raised, 7000), 5800);
        assert_eq!(longest_behind(&sent, &raised, 7000), 5800);
        // Nothing at all: from the first send.
        assert_eq!(longest_stale(&sent, &[], 7000), 6000);
        assert_eq!(longest_behind(&sent, &[], 7000), 6000);
    }

    #[test]
    fn rises_after_the_end_are_left_out() {
        let sent = every_100_ms(2);
        let raised = [(1, 1000), (2, 1100), (3, 9000)];
        let log = SeqSnapshot {
            ids: [("c-1".to_owned(), held(&raised))].into(),
        };
        let figures = Staleness::measure(&sent, ["c-1"], &log, 2000, 5000);
        assert_eq!(figures.updates_median, 2);
        assert_eq!(figures.last_to_all_ms, Some(0));
    }

    #[test]
    fn the_audience_is_judged_as_a_whole() {
        let sent = every_100_ms(10);
        // Sent at 1,000 .. 1,900; the end at 20,000.
        let log = SeqSnapshot {
            ids: [
                // Keeps up.
                (
                    "a".to_owned(),
                    held(&(1..=10).map(|s| (s, 905 + 100 * s)).collect::<Vec<_>>()),
                ),
                // 1 at once, then only 10, 8 s after its send.
                ("b".to_owned(), held(&[(1, 1000), (10, 9900)])),
                // Only 3, and never the last.
                ("c".to_owned(), held(&[(3, 1300)])),
                // Not in the audience: left out.
                ("z".to_owned(), held(&[(10, 2000)])),
            ]
            .into(),
        };
        let figures = Staleness::measure(&sent, ["a", "b", "c", "d"], &log, 20_000, 5000);
        assert_eq!(
            figures,
            Staleness {
                connections: 4,
                stale_over: 3,
                behind_over: 3,
                no_update: 1,
                have_last: 2,
                last_to_all_ms: None,
                stale_median_ms: 19_000,
                stale_max_ms: 19_000,
                behind_median_ms: 18_700,
                behind_max_ms: 19_000,
                updates_median: 2,
                kept_up_span: Some((0, 0)),
            }
        );
        // Without the two that never had the last value: b had it 8,000 ms
        // after its send.
        let figures = Staleness::measure(&sent, ["a", "b"], &log, 20_000, 5000);
        assert_eq!(figures.last_to_all_ms, Some(8000));
        assert_eq!((figures.stale_over, figures.behind_over), (1, 1));
        assert_eq!(figures.behind_max_ms, 8800, "2 was sent at 1,100");
    }
}
