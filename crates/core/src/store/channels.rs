//! Several channels as one audience, read through the store one channel at a
//! time, each connection once.
//!
//! How depends on the table's layout ([`ChannelOrder`]):
//! - [`ChannelOrder::Disjoint`]: each row has one channel, so no connection
//!   is in two of them. The channels are read one after the other; channel
//!   `i` of the job's list is segment `i` of the cursors, so a continuation
//!   resumes each where it stopped.
//! - [`ChannelOrder::ById`]: one row per (channel, connection), each
//!   channel's rows in connection-id order. The channels are merged in id
//!   order (a k-way merge: one page per channel held, whatever the
//!   audience's size) and an id read from several channels is sent to once.
//!   Its other rows ride along as the page's
//!   [`duplicates`](crate::store::Page::duplicates), removed with it if it
//!   is gone. One cursor resumes every channel: after the last id handed
//!   out ([`Position::After`]).

use std::collections::VecDeque;

use futures::StreamExt;
use futures::stream::{self, BoxStream};

use crate::connection::expiry::{AgeProblems, Expired};
use crate::connection::{Connection, ConnectionId};
use crate::store::{
    AudienceQuery, ChannelOrder, ConnectionStore, Cursor, Page, Position, StoreError,
};

/// The union of `channels`' rows as pages, from `from` (cursors this stream
/// handed out before).
pub fn pages<S: ConnectionStore>(
    store: &S,
    channels: &[String],
    from: Option<Vec<Cursor>>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    match store.channel_order() {
        ChannelOrder::Disjoint => concatenated(store, channels, from.as_deref()),
        ChannelOrder::ById => merged(store, channels, from.as_deref()),
    }
}

fn concatenated<S: ConnectionStore>(
    store: &S,
    channels: &[String],
    from: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let queries = channels
        .iter()
        .map(|channel| AudienceQuery::Channel(channel.clone()));
    one_after_another(store, queries, from)
}

/// Several queries read one after the other as one audience: query `i` is
/// segment `i` of the cursors, so a continuation resumes each where it
/// stopped. For audiences no connection is in two of (disjoint channels,
/// the keys of a named audience).
pub fn one_after_another<S: ConnectionStore>(
    store: &S,
    queries: impl Iterator<Item = AudienceQuery>,
    from: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let streams: Vec<_> = queries
        .enumerate()
        .map(|(i, query)| {
            let segment = i as u32;
            // Channel `i`'s cursor, as the store knows it: its one segment.
            let start = from
                .and_then(|cursors| cursors.iter().find(|c| c.segment == segment))
                .map(|c| {
                    vec![Cursor {
                        segment: 0,
                        position: c.position.clone(),
                    }]
                });
            store.pages(&query, start).map(move |page| {
                page.map(|mut page| {
                    page.next.segment = segment;
                    page
                })
            })
        })
        .collect();
    stream::iter(streams).flatten().boxed()
}

/// One channel's side of the merge.
struct Source {
    pages: BoxStream<'static, Result<Page, StoreError>>,
    /// The rest of its current page.
    buffered: VecDeque<Connection>,
    /// Rows its pages found certainly gone by age, and the untrusted
    /// starts, not yet handed out with a merged page.
    expired: Vec<Expired>,
    age_problems: AgeProblems,
    /// Whether its pages have ended.
    ended: bool,
}

impl Source {
    /// Fills `buffered` unless the channel has ended; the front is then its
    /// next id.
    async fn fill(&mut self) -> Result<(), StoreError> {
        while self.buffered.is_empty() && !self.ended {
            match self.pages.next().await {
                Some(page) => {
                    let page = page?;
                    self.buffered.extend(page.connections);
                    self.expired.extend(page.expired);
                    self.age_problems.merge(&page.age_problems);
                }
                None => self.ended = true,
            }
        }
        Ok(())
    }
}

/// The merge's state between pages.
struct Merge {
    sources: Vec<Source>,
    /// The last id handed out: later rows with it are duplicates, even
    /// across pages.
    last: Option<ConnectionId>,
    /// Ids per page handed out: the largest page a channel gave, so the
    /// merged pages follow the configured page size.
    page_len: usize,
}

fn merged<S: ConnectionStore>(
    store: &S,
    channels: &[String],
    from: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let resume = from.and_then(|cursors| cursors.iter().find(|c| c.segment == 0));
    let last = match resume.map(|c| &c.position) {
        None => None,
        Some(None) => return stream::empty().boxed(),
        Some(Some(Position::After { after })) => Some(after.clone()),
        Some(Some(other)) => {
            let err = StoreError::Rejected(format!(
                "a merge of channels resumes after an id, not from {other:?}"
            ));
            return stream::once(async { Err(err) }).boxed();
        }
    };
    let sources = channels
        .iter()
        .map(|channel| {
            let start = last.as_ref().map(|after| {
                vec![Cursor {
                    segment: 0,
                    position: Some(Position::After {
                        after: after.clone(),
                    }),
                }]
            });
            Source {
                pages: store.pages(&AudienceQuery::Channel(channel.clone()), start),
                buffered: VecDeque::new(),
                expired: Vec::new(),
                age_problems: AgeProblems::default(),
                ended: false,
            }
        })
        .collect();
    let merge = Merge {
        sources,
        last,
        page_len: 1,
    };
    stream::unfold(Some(merge), |state| async move {
        let mut merge = state?;
        match merge.next_page().await {
            Ok(Some(page)) => Some((Ok(page), Some(merge))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

impl Merge {
    /// What the channels' pages found aged so far, for the next merged page.
    fn take_aged(&mut self) -> (Vec<Expired>, AgeProblems) {
        let mut expired = Vec::new();
        let mut problems = AgeProblems::default();
        for source in &mut self.sources {
            expired.append(&mut source.expired);
            problems.merge(&std::mem::take(&mut source.age_problems));
        }
        (expired, problems)
    }

    /// The next page of distinct ids in order, or `None` after the last.
    async fn next_page(&mut self) -> Result<Option<Page>, StoreError> {
        let mut connections = Vec::new();
        let mut duplicates = Vec::new();
        loop {
            for source in &mut self.sources {
                source.fill().await?;
                self.page_len = self.page_len.max(source.buffered.len());
            }
            let smallest = self
                .sources
                .iter()
                .filter_map(|s| s.buffered.front())
                .map(|c| c.id.clone())
                .min();
            let Some(id) = smallest else {
                // Every channel has ended.
                let (expired, age_problems) = self.take_aged();
                if connections.is_empty() && duplicates.is_empty() && expired.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Page {
                    connections,
                    duplicates,
                    next: Cursor {
                        segment: 0,
                        position: None,
                    },
                    expired,
                    age_problems,
                }));
            };
            for source in &mut self.sources {
                while source.buffered.front().is_some_and(|c| c.id == id) {
                    let row = source.buffered.pop_front().expect("a front");
                    if self.last.as_ref() == Some(&row.id) {
                        duplicates.push(row);
                    } else {
                        self.last = Some(row.id.clone());
                        connections.push(row);
                    }
                }
            }
            if connections.len() >= self.page_len {
                let after = self.last.clone().expect("an id was handed out");
                let (expired, age_problems) = self.take_aged();
                return Ok(Some(Page {
                    connections,
                    duplicates,
                    next: Cursor {
                        segment: 0,
                        position: Some(Position::After { after }),
                    },
                    expired,
                    age_problems,
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::FakeTable;
    use std::collections::{BTreeSet, HashMap};
    use std::sync::Arc;

    fn table(
        channels: &[(&str, &[&str])],
        page_size: usize,
        order: ChannelOrder,
    ) -> Arc<FakeTable> {
        let mut table = FakeTable::with(&[], page_size);
        table.channels = channels
            .iter()
            .map(|(name, ids)| {
                (
                    (*name).to_owned(),
                    ids.iter().map(|id| (*id).to_owned()).collect(),
                )
            })
            .collect::<HashMap<_, _>>();
        table.channel_order = order;
        Arc::new(table)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|c| (*c).to_owned()).collect()
    }

    async fn read(
        table: &Arc<FakeTable>,
        channels: &[&str],
        from: Option<Vec<Cursor>>,
    ) -> Vec<Page> {
        pages(table, &names(channels), from)
            .map(|p| p.expect("a page"))
            .collect()
            .await
    }

    fn ids(pages: &[Page]) -> Vec<String> {
        pages
            .iter()
            .flat_map(|p| &p.connections)
            .map(|c| c.id.to_string())
            .collect()
    }

    #[tokio::test]
    async fn overlapping_channels_in_id_order_give_each_id_once_in_order() {
        let t = table(
            &[
                ("a", &["c01", "c03", "c05", "c07", "c09"]),
                ("b", &["c02", "c03", "c06", "c07"]),
                ("c", &["c03", "c04", "c07", "c10"]),
            ],
            2,
            ChannelOrder::ById,
        );
        let pages = read(&t, &["a", "b", "c"], None).await;
        assert_eq!(
            ids(&pages),
            [
                "c01", "c02", "c03", "c04", "c05", "c06", "c07", "c09", "c10"
            ]
        );
        // c03 is in three channels, c07 in three: two duplicate rows each.
        let mut duplicates: Vec<String> = pages
            .iter()
            .flat_map(|p| &p.duplicates)
            .map(|c| c.id.to_string())
            .collect();
        duplicates.sort();
        assert_eq!(duplicates, ["c03", "c03", "c07", "c07"]);
        assert!(
            pages
                .iter()
                .all(|p| p.connections.len() <= 2 || p.next.position.is_none())
        );
        assert_eq!(pages.last().unwrap().next.position, None, "the end");
    }

    #[tokio::test]
    async fn a_merge_resumes_after_the_last_id_of_any_page_it_handed_out() {
        let t = table(
            &[
                ("a", &["c1", "c2", "c4", "c6", "c8"]),
                ("b", &["c2", "c3", "c4", "c7", "c8", "c9"]),
            ],
            2,
            ChannelOrder::ById,
        );
        let whole = ids(&read(&t, &["a", "b"], None).await);
        assert_eq!(whole, ["c1", "c2", "c3", "c4", "c6", "c7", "c8", "c9"]);
        let first = read(&t, &["a", "b"], None).await;
        for (n, page) in first.iter().enumerate() {
            let rest = ids(&read(&t, &["a", "b"], Some(vec![page.next.clone()])).await);
            let before: Vec<String> = ids(&first[..=n]);
            let mut joined = before.clone();
            joined.extend(rest.clone());
            assert_eq!(joined, whole, "resumed after page {n}");
            let unique: BTreeSet<_> = joined.iter().collect();
            assert_eq!(unique.len(), joined.len(), "nothing twice");
        }
    }

    #[tokio::test]
    async fn disjoint_channels_are_read_one_after_the_other_each_resumable() {
        let t = table(
            &[
                ("a", &["a1", "a2", "a3"]),
                ("b", &["b1", "b2"]),
                ("c", &["c1"]),
            ],
            2,
            ChannelOrder::Disjoint,
        );
        let pages = read(&t, &["a", "b", "c"], None).await;
        assert_eq!(ids(&pages), ["a1", "a2", "a3", "b1", "b2", "c1"]);
        let segments: Vec<u32> = pages.iter().map(|p| p.next.segment).collect();
        assert_eq!(segments, [0, 0, 1, 2], "a channel's cursor is its segment");
        assert!(pages.iter().all(|p| p.duplicates.is_empty()));
        // Channel a half done, b done, c not started.
        let from = vec![
            pages[0].next.clone(),
            Cursor {
                segment: 1,
                position: None,
            },
        ];
        assert_eq!(
            ids(&read(&t, &["a", "b", "c"], Some(from)).await),
            ["a3", "c1"]
        );
    }

    #[tokio::test]
    async fn a_failing_channel_fails_the_merge() {
        let mut t = FakeTable::with(&[], 2);
        t.channels
            .insert("a".into(), vec!["x1".into(), "x2".into(), "x3".into()]);
        t.channel_order = ChannelOrder::ById;
        t.fail_after_pages = Some(1);
        let t = Arc::new(t);
        let results: Vec<_> = pages(&t, &names(&["a"]), None).collect().await;
        assert!(results.iter().any(Result::is_err), "{}", results.len());
        // An offset is no cursor of a merge.
        let wrong = Some(vec![Cursor {
            segment: 0,
            position: Some(Position::Offset(3)),
        }]);
        let results: Vec<_> = pages(&t, &names(&["a"]), wrong).collect().await;
        assert!(matches!(results[..], [Err(StoreError::Rejected(_))]));
    }
}
