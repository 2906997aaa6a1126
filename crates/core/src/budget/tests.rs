use super::adaptive::*;
use super::*;

fn settings(per_second: u32, adaptive: bool) -> RateSettings {
    RateSettings {
        per_second: NonZeroU32::new(per_second).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
        adaptive,
    }
}

#[tokio::test]
async fn in_flight_is_bounded() {
    let budget = SendBudget::new(None, 2);
    let a = budget.acquire().await;
    let _b = budget.acquire().await;
    assert_eq!(budget.available(), 0);
    // A third waits until one is released.
    let third = budget.acquire();
    tokio::pin!(third);
    assert!(futures::poll!(&mut third).is_pending());
    drop(a);
    let _c = third.await;
    assert_eq!(budget.available(), 0);
}

#[tokio::test]
async fn the_burst_passes_at_once_and_no_more() {
    let budget = SendBudget::new(Some(settings(10, true)), 100);
    for _ in 0..3 {
        drop(budget.acquire().await);
    }
    // The fourth needs a fresh cell; governor answers that without
    // waiting when asked directly.
    let rate = budget.rate.as_ref().unwrap();
    assert!(rate.ceiling_limiter.check().is_err());
}

#[test]
fn under_the_ceiling_sends_are_paced_at_the_current_rate() {
    let rate = AdaptiveRate::new(settings(1000, true));
    let t0 = Instant::now();
    assert_eq!(rate.pace(t0), None, "at the ceiling governor alone paces");
    rate.set(800.0);
    // 800/s: one slot every 1.25 ms, reserved in turn.
    let slots: Vec<_> = (0..4).map(|_| rate.pace(t0)).collect();
    assert_eq!(slots[0], None, "the first goes at once");
    let gap = Duration::from_micros(1250);
    assert_eq!(slots[1], Some(t0 + gap));
    assert_eq!(slots[3], Some(t0 + gap * 3));
    // A later cut applies to the very next reservation.
    rate.set(640.0);
    let after = rate.pace(t0).unwrap();
    assert_eq!(after, t0 + gap * 4);
    assert_eq!(
        rate.pace(t0).unwrap() - after,
        Duration::from_nanos(1_562_500)
    );
}

/// `n` accepted answers spread evenly over `span` from `from`.
fn accepted(rate: &AdaptiveRate, from: Instant, span: Duration, n: u32) {
    for i in 0..n {
        rate.succeeded(from + span * i / n);
    }
}

/// A 429 to a post sent as it came back, the first of its connection.
fn refused(rate: &AdaptiveRate, at: Instant) {
    rate.throttled(at, at, 1);
}

/// A rate of 1000/s that accepted `n` answers over its first half second;
/// returns it and the end of that half second.
fn half_a_second_accepting(n: u32, adaptive: bool) -> (AdaptiveRate, Instant) {
    let rate = AdaptiveRate::new(settings(1000, adaptive));
    let t0 = Instant::now();
    let half = Duration::from_millis(500);
    accepted(&rate, t0, half, n);
    (rate, t0 + half)
}

#[test]
fn a_cut_goes_to_the_rate_accepted_since_the_first_429_not_counting_the_burst() {
    let rate = AdaptiveRate::new(settings(100_000, true));
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    // A burst of 1,500 in 5 ms, then the bucket is empty.
    accepted(&rate, t0, ms(5), 1500);
    let t1 = t0 + ms(5);
    refused(&rate, t1);
    assert_eq!(rate.current(), 100_000.0, "one 429 measures nothing");
    // 3,000/s refilled and taken while most posts meet an empty bucket.
    accepted(&rate, t1, ms(10), 30);
    refused(&rate, t1 + ms(10));
    let target = 3000.0 * UNDER_ACCEPTED;
    assert!(
        (rate.current() - target).abs() < target * 0.05,
        "cut to {}, not to about {target}",
        rate.current()
    );
    // A later 429 of the same run measures over the longer span.
    accepted(&rate, t1 + ms(10), ms(90), 270);
    refused(&rate, t1 + ms(100));
    assert!(
        (rate.current() - target).abs() < target * 0.02,
        "{}",
        rate.current()
    );
}

#[test]
fn a_cluster_of_429s_to_posts_sent_before_the_cut_cuts_nothing_more() {
    let rate = AdaptiveRate::new(settings(100_000, true));
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    refused(&rate, t0);
    accepted(&rate, t0, ms(10), 30);
    let cut_at = t0 + ms(10);
    refused(&rate, cut_at);
    let cut = rate.current();
    // The posts in flight at the cut meet the empty bucket too.
    for n in 1..=128 {
        rate.throttled(cut_at + Duration::from_micros(n * 10), cut_at - ms(1), 1);
    }
    assert_eq!(rate.current(), cut);
}

#[test]
fn nothing_accepted_for_a_while_cuts_to_the_floor() {
    let rate = AdaptiveRate::new(settings(1000, true));
    let t0 = Instant::now();
    refused(&rate, t0);
    refused(&rate, t0 + Duration::from_millis(100));
    assert_eq!(rate.current(), 1000.0, "not measured yet");
    refused(&rate, t0 + MAX_MEASURE_SPAN);
    assert_eq!(rate.current(), 1.0, "0.1% of the ceiling");
}

#[test]
fn quiet_time_climbs_back_by_a_share_of_the_current_rate_up_to_the_ceiling() {
    let rate = AdaptiveRate::new(settings(100_000, true));
    let t0 = Instant::now();
    refused(&rate, t0);
    accepted(&rate, t0, Duration::from_millis(900), 2700);
    let t1 = t0 + Duration::from_millis(900);
    refused(&rate, t1);
    let cut = rate.current();
    assert!((cut - 3000.0 * UNDER_ACCEPTED).abs() < 5.0, "{cut}");
    // Held right after the cut.
    rate.succeeded(t1 + Duration::from_millis(500));
    assert_eq!(rate.current(), cut);
    // 5% of the current rate per second after the hold, not 2% of
    // 100,000.
    rate.succeeded(t1 + HOLD_AFTER_DECREASE + Duration::from_secs(1));
    assert!(
        (rate.current() - cut * 1.05).abs() < 1.0,
        "{} after {cut}",
        rate.current()
    );
    rate.succeeded(t1 + Duration::from_secs(100_000));
    assert_eq!(rate.current(), 100_000.0);
}

#[test]
fn one_clients_run_of_429s_cuts_nothing_while_the_others_succeed() {
    let (rate, t1) = half_a_second_accepting(500, true);
    // Its first 429, then its next ones, while the others succeed.
    rate.throttled(t1, t1, 1);
    accepted(&rate, t1, Duration::from_millis(100), 100);
    let t2 = t1 + Duration::from_millis(100);
    rate.throttled(t2, t2, 2);
    rate.throttled(t2, t2, CLIENT_STREAK);
    rate.throttled(t2, t2, CLIENT_STREAK + 5);
    assert_eq!(rate.current(), 1000.0, "one slow client is not the account");
    // Another connection's first 429: the account's throttle.
    refused(&rate, t2);
    assert!(rate.current() < 1000.0);
}

#[test]
fn runs_of_429s_while_the_others_are_throttled_too_cut_the_rate() {
    let (rate, t1) = half_a_second_accepting(100, true);
    for _ in 0..30 {
        refused(&rate, t1);
    }
    for _ in 0..30 {
        rate.throttled(t1 + MAX_MEASURE_SPAN, t1, CLIENT_STREAK);
    }
    assert!(rate.current() < 1000.0, "more than 10% of posts throttled");
}

/// A model of one broadcast over simulated time: a token-bucket
/// endpoint (API Gateway's account throttle) and a sender paced by
/// [`AdaptiveRate`], with `in_flight` connections sent to at once, as the
/// engine does, each retrying 429s and 5xx after the engine's backoff.
mod simulation {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;
    use crate::backoff::Backoff;
    use crate::fakes::Xorshift;

    pub struct Scenario {
        /// The throttle's steady rate and burst.
        pub accepts: f64,
        pub burst: f64,
        pub connections: u32,
        /// Every `gone_every`-th connection answers 410.
        pub gone_every: u32,
        /// Share of answers that are 500, at (seeded) random.
        pub fail_share: f64,
        /// What the sender can post per second at most (the machine).
        pub sender_per_second: f64,
        pub latency: Duration,
        pub in_flight: usize,
        pub ceiling: u32,
        pub seed: u64,
    }

    #[derive(Debug)]
    pub struct Outcome {
        pub posts: u64,
        pub throttled: u64,
        pub delivered: u64,
        /// Delivered ÷ (last delivery's post − first post).
        pub delivery_rate: f64,
    }

    impl Outcome {
        pub fn throttled_share(&self) -> f64 {
            self.throttled as f64 / self.posts as f64
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Event {
        /// The connection asks for its slot.
        Ready(u32),
        /// Its post reaches the endpoint.
        Post(u32),
        /// Its answer comes back: 0 accepted, 1 gone, 2 throttled, 3 500;
        /// with when it was sent, in nanoseconds.
        Answer(u32, u8, u64),
    }

    pub fn run(s: &Scenario) -> Outcome {
        let rate = AdaptiveRate::new(RateSettings {
            per_second: NonZeroU32::new(s.ceiling).unwrap(),
            burst: NonZeroU32::new(s.ceiling).unwrap(),
            adaptive: true,
        });
        let t0 = rate.born;
        let at = |ns: u64| t0 + Duration::from_nanos(ns);
        let ns = |d: Duration| d.as_nanos() as u64;
        // The engine's defaults: 100 ms doubling to 2 s, six attempts.
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            max_attempts: 6,
        };
        let mut random = Xorshift(s.seed | 1);
        let mut events = BinaryHeap::new();
        let mut seq = 0u64;
        let mut push = |events: &mut BinaryHeap<_>, when: u64, e: Event| {
            seq += 1;
            events.push(Reverse((when, seq, e)));
        };
        let mut next_connection = 0u32;
        for _ in 0..s.in_flight.min(s.connections as usize) {
            push(&mut events, 0, Event::Ready(next_connection));
            next_connection += 1;
        }
        let mut streak = vec![0u32; s.connections as usize];
        let mut attempts = vec![0u32; s.connections as usize];
        let (mut tokens, mut filled_at) = (s.burst, 0u64);
        let mut sender_free = 0u64;
        let sender_gap = 1e9 / s.sender_per_second;
        let (mut posts, mut throttled, mut delivered) = (0u64, 0u64, 0u64);
        let (mut first_post, mut last_delivery) = (None, 0u64);
        while let Some(Reverse((now, _, event))) = events.pop() {
            match event {
                Event::Ready(c) => {
                    let slot = rate.pace(at(now)).map_or(now, |slot| ns(slot - t0));
                    let post = slot.max(sender_free);
                    sender_free = post + sender_gap as u64;
                    push(&mut events, post, Event::Post(c));
                }
                Event::Post(c) => {
                    posts += 1;
                    first_post.get_or_insert(now);
                    let elapsed = (now - filled_at) as f64 / 1e9;
                    tokens = (tokens + elapsed * s.accepts).min(s.burst);
                    filled_at = now;
                    let answer = if tokens < 1.0 {
                        2
                    } else {
                        tokens -= 1.0;
                        if s.gone_every > 0 && c % s.gone_every == 0 {
                            1
                        } else if random.unit() < s.fail_share {
                            3
                        } else {
                            0
                        }
                    };
                    push(
                        &mut events,
                        now + ns(s.latency),
                        Event::Answer(c, answer, now),
                    );
                }
                Event::Answer(c, answer, sent) => {
                    let i = c as usize;
                    let retry = match answer {
                        0 | 1 => {
                            rate.succeeded(at(now));
                            if answer == 0 {
                                delivered += 1;
                                last_delivery = sent;
                            }
                            None
                        }
                        2 => {
                            throttled += 1;
                            streak[i] += 1;
                            rate.throttled(at(now), at(sent), streak[i]);
                            Some(backoff.cap(streak[i] - 1))
                        }
                        _ => {
                            rate.passed.fetch_add(1, Ordering::Relaxed);
                            streak[i] = 0;
                            attempts[i] += 1;
                            backoff
                                .allows_another(attempts[i])
                                .then(|| backoff.cap(attempts[i] - 1))
                        }
                    };
                    if answer != 2 {
                        streak[i] = 0;
                    }
                    match retry {
                        Some(cap) => {
                            let delay = (ns(cap) as f64 * random.unit()) as u64;
                            push(&mut events, now + delay, Event::Ready(c));
                        }
                        None if next_connection < s.connections => {
                            push(&mut events, now, Event::Ready(next_connection));
                            next_connection += 1;
                        }
                        None => {}
                    }
                }
            }
        }
        let span = (last_delivery - first_post.unwrap_or(0)) as f64 / 1e9;
        Outcome {
            posts,
            throttled,
            delivered,
            delivery_rate: delivered as f64 / span,
        }
    }
}

/// The missed-clients scenario: 3,000/s with a burst of 1,500, 5 % 500s,
/// 6,000 connections of which 10 % are gone, a 100,000/s ceiling, 128 in
/// flight; a sender that can post 20,000/s, or only 1,200/s against the
/// throttle scaled down five times. Over simulated time: at most 5 % of
/// the posts throttled, and the delivery rate at least 90 % of what the
/// endpoint accepts.
#[test]
fn in_simulated_time_the_rate_converges_with_few_429s() {
    use simulation::{Scenario, run};
    let issue = |seed, sender_per_second| Scenario {
        accepts: 3000.0,
        burst: 1500.0,
        connections: 6000,
        gone_every: 10,
        fail_share: 0.05,
        sender_per_second,
        latency: Duration::from_millis(1),
        in_flight: 128,
        ceiling: 100_000,
        seed,
    };
    let scaled = |seed| Scenario {
        accepts: 600.0,
        burst: 300.0,
        connections: 3000,
        gone_every: 0,
        fail_share: 0.0,
        sender_per_second: 1200.0,
        latency: Duration::from_millis(2),
        in_flight: 128,
        ceiling: 100_000,
        seed,
    };
    for (name, scenario) in [
        ("issue, fast sender", issue(1, 20_000.0)),
        ("issue, fast sender", issue(2, 20_000.0)),
        ("issue, faster sender", issue(3, 100_000.0)),
        ("scaled down", scaled(4)),
        ("scaled down", scaled(5)),
    ] {
        let out = run(&scenario);
        let accepts = scenario.accepts;
        println!(
            "{name}: {out:?}, {:.2} % throttled, {:.0} % of {accepts}/s",
            out.throttled_share() * 100.0,
            out.delivery_rate / accepts * 100.0
        );
        let gone = if scenario.gone_every > 0 {
            scenario.connections.div_ceil(scenario.gone_every)
        } else {
            0
        };
        assert_eq!(out.delivered, u64::from(scenario.connections - gone));
        assert!(out.throttled_share() <= 0.05, "{name}: {out:?}");
        assert!(out.delivery_rate >= 0.9 * accepts, "{name}: {out:?}");
    }
}

#[test]
fn a_fixed_rate_ignores_429s() {
    let rate = AdaptiveRate::new(settings(1000, false));
    let t0 = Instant::now();
    for n in 0..100 {
        refused(&rate, t0 + Duration::from_millis(n * 10));
    }
    assert_eq!(rate.current(), 1000.0);
}

#[test]
fn a_fixed_rate_still_tells_one_slow_client_from_the_account() {
    let (rate, t1) = half_a_second_accepting(500, false);
    assert!(!rate.throttled(t1, t1, 1), "one 429 is no run");
    accepted(&rate, t1, Duration::from_millis(100), 100);
    let t2 = t1 + Duration::from_millis(100);
    assert!(
        rate.throttled(t2, t2, CLIENT_STREAK),
        "a run of 429s on one connection while the others succeed"
    );
    assert_eq!(rate.current(), 1000.0, "a fixed rate is never cut");
}
#[test]
fn a_share_under_the_ceiling_paces_sends_at_the_share() {
    let rate = AdaptiveRate::new(settings(1000, true));
    let t0 = Instant::now();
    rate.set_share(Some(500.0));
    assert_eq!(rate.pace(t0), None, "the first goes at once");
    assert_eq!(rate.pace(t0), Some(t0 + Duration::from_millis(2)));
    // A share above the ceiling leaves the ceiling to governor.
    rate.set_share(Some(5000.0));
    assert_eq!(rate.pace(t0), None);
    rate.set_share(None);
    assert_eq!(rate.pace(t0), None);
}

#[test]
fn the_adaptive_rate_still_cuts_below_the_share() {
    let budget = SendBudget::new(Some(settings(100_000, true)), 8);
    budget.set_share(Some(5000.0));
    assert_eq!(budget.current_rate(), Some(5000.0));
    let rate = budget.rate.as_ref().unwrap();
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    // The endpoint takes 3,000/s: the cut goes under that, under the
    // share.
    refused(rate, t0);
    accepted(rate, t0, ms(10), 30);
    refused(rate, t0 + ms(10));
    let cut = budget.current_rate().unwrap();
    assert!((cut - 3000.0 * UNDER_ACCEPTED).abs() < 150.0, "{cut}");
    // A share under the cut caps it again.
    budget.set_share(Some(1000.0));
    assert_eq!(budget.current_rate(), Some(1000.0));
    assert_eq!(budget.share(), Some(1000.0));
    budget.set_share(None);
    assert_eq!(budget.share(), None);
}

#[tokio::test]
async fn a_share_of_zero_holds_sends_until_it_rises() {
    let budget = SendBudget::new(Some(settings(1000, true)), 8);
    budget.set_share(Some(0.0));
    let held = budget.acquire();
    tokio::pin!(held);
    assert!(futures::poll!(&mut held).is_pending());
    assert!(futures::poll!(&mut held).is_pending(), "still held");
    budget.set_share(Some(100.0));
    let _sent = held.await;
    // Not a number is no share: held, not unlimited.
    budget.set_share(Some(f64::NAN));
    assert_eq!(budget.share(), Some(0.0));
}

#[test]
fn without_a_rate_limit_a_share_changes_nothing() {
    let budget = SendBudget::new(None, 8);
    budget.set_share(Some(0.0));
    assert_eq!(budget.share(), None);
    assert_eq!(budget.ceiling(), None);
    assert_eq!(
        SendBudget::new(Some(settings(700, false)), 8).ceiling(),
        Some(700)
    );
}

#[test]
fn waits_add_up_to_whole_milliseconds_without_losing_the_short_ones() {
    let budget = SendBudget::new(Some(settings(1000, true)), 8);
    let metrics = Metrics::default();
    for _ in 0..5 {
        budget.count_wait(Duration::from_micros(400), &metrics);
    }
    assert_eq!(Metrics::get(&metrics.budget_wait_ms), 2, "2.0 ms in all");
    budget.count_wait(Duration::from_millis(7), &metrics);
    assert_eq!(Metrics::get(&metrics.budget_wait_ms), 9);
    budget.count_wait(Duration::ZERO, &metrics);
    assert_eq!(Metrics::get(&metrics.budget_wait_ms), 9);
}
