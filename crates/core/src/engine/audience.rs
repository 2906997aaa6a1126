//! Where a run's connections come from: the audience query a job's target
//! asks for, the pages that answer it (from the store, a merge of channels,
//! or a continuation's own list), and the read-ahead that keeps the next
//! pages ready while the sends go.

use futures::stream::BoxStream;
use futures::{Stream, StreamExt, stream};
use tokio_util::task::AbortOnDropHandle;

use crate::connection::{Connection, ConnectionId};
use crate::job::{Job, Target};
use crate::store::{AudienceQuery, ConnectionStore, Cursor, Page, Position, StoreError};

/// The connections at most one deferred-audience page holds.
const DEFERRED_PAGE: usize = 1000;

/// Pages read while earlier ones are being sent, beyond the one being sent.
pub const READ_AHEAD_PAGES: usize = 2;

/// The store query for a job's target. A continuation's deferred list, a
/// merge of channels and several audience keys are not one query: they get
/// an empty explicit list here and their pages from [`pages`].
pub(super) fn query(job: &Job, scan_segments: u32) -> AudienceQuery {
    match &job.target {
        Target::All => match job.segment {
            Some(share) => AudienceQuery::Segment {
                index: share.index,
                total: share.total,
            },
            None => AudienceQuery::All {
                segments: scan_segments,
            },
        },
        Target::Channel(channel) => AudienceQuery::Channel(channel.clone()),
        Target::Audience { name, values } => match &values[..] {
            [value] => AudienceQuery::Audience {
                name: name.clone(),
                value: value.clone(),
            },
            _ => AudienceQuery::Explicit(Vec::new()),
        },
        Target::Connections(ids) => AudienceQuery::Explicit(ids.clone()),
        Target::Deferred(_) | Target::Channels(_) => AudienceQuery::Explicit(Vec::new()),
    }
}

/// The audience's pages from the job's resume point, read ahead of the
/// sends (see [`read_ahead`]).
pub(super) fn pages<S: ConnectionStore>(
    store: &std::sync::Arc<S>,
    job: &Job,
    query: &AudienceQuery,
) -> impl Stream<Item = Result<Page, StoreError>> + use<S> {
    let pages = match &job.target {
        _ if job.wrap => wrapped(
            &**store,
            query,
            job.resume.as_deref(),
            job.round_end.clone(),
        ),
        _ if let Some(end) = &job.round_end => {
            up_to(store.pages(query, job.resume.clone()), end.clone(), false)
        }
        Target::Deferred(connections) => deferred_pages(connections, job.resume.as_deref()),
        Target::Channels(channels) => {
            crate::store::channels::pages(&**store, channels, job.resume.clone())
        }
        Target::Audience { name, values } if values.len() > 1 => {
            let keys = values.iter().map(|value| AudienceQuery::Audience {
                name: name.clone(),
                value: value.clone(),
            });
            crate::store::channels::one_after_another(&**store, keys, job.resume.as_deref())
        }
        _ => store.pages(query, job.resume.clone()),
    };
    read_ahead(pages)
}

/// A newer update's read when it takes over from an older one: from where
/// the older stopped to the end (segment 0, resumed from its cursor), then
/// from the start again (segment 1) up to the first connection segment 0
/// read, so every connection gets it once. Resumed after a crash with segment
/// 0 already read, that first connection is not known: segment 1 then reads
/// to the end (a few connections twice, none missed).
///
/// With `end` (a stream's next round, see [`Job::round_end`]) the round
/// stops before that connection instead: within segment 0 when it lies
/// after the start, else in segment 1.
fn wrapped<S: ConnectionStore>(
    store: &S,
    query: &AudienceQuery,
    resume: Option<&[Cursor]>,
    end: Option<ConnectionId>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let cursor = |segment: u32| {
        resume
            .unwrap_or_default()
            .iter()
            .find(|c| c.segment == segment)
            .map(|c| Cursor {
                segment: 0,
                position: c.position.clone(),
            })
    };
    let start = cursor(0).and_then(|c| match c.position {
        Some(Position::After { after }) => Some(after),
        _ => None,
    });
    if let Some(end) = end
        .as_ref()
        .filter(|end| start.as_ref().is_some_and(|start| *end > start))
    {
        return up_to(
            store.pages(query, cursor(0).map(|c| vec![c])),
            end.clone(),
            true,
        );
    }
    let first: std::sync::Arc<std::sync::Mutex<Option<ConnectionId>>> = Default::default();
    let explicit = end.is_some();
    if let Some(end) = end {
        // Segment 1 stops there; segment 0 reads to the audience's end.
        *first.lock().unwrap_or_else(|p| p.into_inner()) = Some(end);
    }
    let seen = first.clone();
    let to_end = store
        .pages(query, cursor(0).map(|c| vec![c]))
        .map(move |page| {
            if let Ok(page) = &page
                && let Some(c) = page.connections.first()
            {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| c.id.clone());
            }
            page
        });
    let again = store.pages(query, cursor(1).map(|c| vec![c]));
    to_end.chain(round_to(again, first, explicit)).boxed()
}

/// Segment 1 of a wrapped read: `pages` from the start up to the
/// connection in `stop` (set by segment 0's first, unless `explicit`: a
/// stream's round end, in id order, perhaps gone since).
fn round_to(
    pages: BoxStream<'static, Result<Page, StoreError>>,
    stop: std::sync::Arc<std::sync::Mutex<Option<ConnectionId>>>,
    explicit: bool,
) -> impl Stream<Item = Result<Page, StoreError>> {
    stream::unfold(
        (pages, stop, false),
        move |(mut pages, first, done)| async move {
            if done {
                return None;
            }
            let mut page = match pages.next().await? {
                Ok(page) => page,
                Err(e) => return Some((Err(e), (pages, first, true))),
            };
            page.next.segment = 1;
            let stop = first.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let reached = stop.and_then(|id| {
                let mut connections = page.connections.iter();
                if explicit {
                    connections.position(|c| c.id >= id)
                } else {
                    connections.position(|c| c.id == id)
                }
            });
            if let Some(at) = reached {
                // Up to the round's end: the round is complete, and so is
                // segment 1.
                page.connections.truncate(at);
                page.next.position = None;
            }
            Some((Ok(page), (pages, first, reached.is_some())))
        },
    )
}

/// `pages` up to, not including, `end`: the first connection at or past
/// it when they come in id order (`ordered`), else `end` itself (gone
/// since, then none is left out).
fn up_to(
    pages: BoxStream<'static, Result<Page, StoreError>>,
    end: ConnectionId,
    ordered: bool,
) -> BoxStream<'static, Result<Page, StoreError>> {
    stream::unfold((pages, false), move |(mut pages, done)| {
        let end = end.clone();
        async move {
            if done {
                return None;
            }
            let mut page = match pages.next().await? {
                Ok(page) => page,
                Err(e) => return Some((Err(e), (pages, true))),
            };
            let reached = page
                .connections
                .iter()
                .position(|c| if ordered { c.id >= end } else { c.id == end });
            if let Some(at) = reached {
                page.connections.truncate(at);
                page.next.position = None;
            }
            Some((Ok(page), (pages, reached.is_some())))
        }
    })
    .boxed()
}

/// A continuation's deferred connections as pages, resumed from an offset.
pub(super) fn deferred_pages(
    connections: &[Connection],
    resume: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let start = match resume.and_then(|c| c.iter().find(|c| c.segment == 0)) {
        None => 0,
        Some(Cursor {
            position: Some(Position::Offset(n)),
            ..
        }) => *n,
        Some(_) => connections.len(),
    };
    let rest = connections.get(start..).unwrap_or_default().to_vec();
    let pages: Vec<Page> = rest
        .chunks(DEFERRED_PAGE)
        .enumerate()
        .map(|(n, chunk)| {
            Page::new(
                chunk.to_vec(),
                Cursor {
                    segment: 0,
                    position: Some(Position::Offset(
                        (start + (n + 1) * DEFERRED_PAGE).min(connections.len()),
                    )),
                },
            )
        })
        .collect();
    stream::iter(pages.into_iter().map(Ok)).boxed()
}

/// The audience's pages, fetched by a task of their own up to
/// [`READ_AHEAD_PAGES`] ahead of the sends. Read as the sends ask for them,
/// every page boundary would stall the sends for a Scan call's round trip.
/// Dropping the stream stops the reading.
///
/// The stream ends only when the reading task ended the audience: if the
/// task panicked, its closed channel would look like the audience's end and
/// the job would be deleted with the rest unsent, so it ends in an error
/// instead, a passing failure the job is retried for.
pub(super) fn read_ahead(
    mut pages: BoxStream<'static, Result<Page, StoreError>>,
) -> impl Stream<Item = Result<Page, StoreError>> {
    // The channel holds one page less than the read-ahead: the reading task
    // holds the next while it waits for room.
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES - 1);
    let reader = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(page) = pages.next().await {
            if tx.send(page).await.is_err() {
                break;
            }
        }
    }));
    // Owned by the stream, so the reading ends with it.
    stream::unfold(Some((rx, reader)), |state| async move {
        let (mut rx, mut reader) = state?;
        if let Some(page) = rx.recv().await {
            return Some((page, Some((rx, reader))));
        }
        match (&mut reader).await {
            Ok(()) => None,
            Err(e) => Some((
                Err(StoreError::Unavailable(format!(
                    "the task reading the audience failed: {e}"
                ))),
                None,
            )),
        }
    })
}
