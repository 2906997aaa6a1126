//! Which audience pages a broadcast has finished, so an interrupted
//! broadcast can resume after its last fully finished page instead of from
//! the start.
//!
//! Sends finish out of order (they run concurrently), so a page counts as
//! finished when every connection on it has an outcome, and a segment's
//! resume point only moves past pages that are finished *and* follow an
//! unbroken run of finished pages. Resuming there repeats at most the pages
//! that were partly done: one page plus what was in flight.

use std::collections::{BTreeMap, VecDeque};

use crate::store::Cursor;

/// Identifies the page a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTag {
    segment: u32,
    seq: u64,
}

/// One segment's pages in flight.
#[derive(Debug, Default)]
struct Segment {
    /// Sequence number the next page gets.
    next_seq: u64,
    /// Sequence number of the front of `open`.
    first_seq: u64,
    /// Pages not yet passed by the resume point, in order: connections still
    /// without an outcome, and the cursor after the page.
    open: VecDeque<(usize, Cursor)>,
    /// Where to resume: after the last page of the unbroken finished run.
    resume: Option<Cursor>,
}

/// Tracks every segment of one broadcast.
#[derive(Debug, Default)]
pub struct Progress {
    segments: BTreeMap<u32, Segment>,
}

impl Progress {
    /// Seeds the resume points a resumed job started from, so a segment
    /// that makes no progress this time still resumes where it did before.
    pub fn starting_from(cursors: &[Cursor]) -> Self {
        let mut progress = Self::default();
        for cursor in cursors {
            progress.segments.entry(cursor.segment).or_default().resume = Some(cursor.clone());
        }
        progress
    }

    /// Registers a page of `count` connections (after exclusions), which
    /// ends at `next`.
    pub fn start_page(&mut self, count: usize, next: Cursor) -> PageTag {
        let segment_no = next.segment;
        let segment = self.segments.entry(segment_no).or_default();
        let tag = PageTag {
            segment: segment_no,
            seq: segment.next_seq,
        };
        segment.next_seq += 1;
        segment.open.push_back((count, next));
        segment.advance();
        tag
    }

    /// Records that one connection of the tagged page has its outcome.
    pub fn finish(&mut self, tag: PageTag) {
        let Some(segment) = self.segments.get_mut(&tag.segment) else {
            return;
        };
        let Some(index) = tag.seq.checked_sub(segment.first_seq) else {
            return;
        };
        if let Some((remaining, _)) = segment.open.get_mut(index as usize) {
            *remaining = remaining.saturating_sub(1);
        }
        segment.advance();
    }

    /// Where each segment that made progress should resume. A segment not
    /// listed has not finished a page: it starts from its beginning.
    pub fn resume_points(&self) -> Vec<Cursor> {
        self.segments
            .values()
            .filter_map(|segment| segment.resume.clone())
            .collect()
    }
}

impl Segment {
    fn advance(&mut self) {
        while let Some((0, _)) = self.open.front() {
            let (_, cursor) = self.open.pop_front().expect("front exists");
            self.resume = Some(cursor);
            self.first_seq += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Position;

    fn at(segment: u32, offset: usize) -> Cursor {
        Cursor {
            segment,
            position: Some(Position::Offset(offset)),
        }
    }

    #[test]
    fn the_resume_point_moves_only_past_an_unbroken_run_of_finished_pages() {
        let mut progress = Progress::default();
        let p1 = progress.start_page(2, at(0, 2));
        let p2 = progress.start_page(1, at(0, 3));
        assert!(progress.resume_points().is_empty());
        // The second page finishes first: no resume point yet.
        progress.finish(p2);
        assert!(progress.resume_points().is_empty());
        progress.finish(p1);
        assert!(progress.resume_points().is_empty());
        progress.finish(p1);
        // Both pages are done now.
        assert_eq!(progress.resume_points(), [at(0, 3)]);
    }

    #[test]
    fn empty_pages_finish_at_once_and_segments_are_independent() {
        let mut progress = Progress::default();
        progress.start_page(0, at(0, 5));
        let b = progress.start_page(1, at(1, 7));
        assert_eq!(progress.resume_points(), [at(0, 5)]);
        progress.finish(b);
        assert_eq!(progress.resume_points(), [at(0, 5), at(1, 7)]);
        // The end of a segment: a cursor without a position.
        progress.start_page(
            0,
            Cursor {
                segment: 1,
                position: None,
            },
        );
        assert_eq!(
            progress.resume_points()[1],
            Cursor {
                segment: 1,
                position: None
            }
        );
    }

    #[test]
    fn a_resumed_job_keeps_its_old_resume_point_until_it_progresses() {
        let mut progress = Progress::starting_from(&[at(2, 100)]);
        assert_eq!(progress.resume_points(), [at(2, 100)]);
        let tag = progress.start_page(1, at(2, 200));
        assert_eq!(progress.resume_points(), [at(2, 100)]);
        progress.finish(tag);
        assert_eq!(progress.resume_points(), [at(2, 200)]);
    }
}
