//! The split of the fleet's rate, as pure functions every task computes
//! alike from the same leases: the max-min fair split of the claims
//! (water-filling), then what the claims leave unclaimed, split equally
//! among the tasks that have work.

/// Each demand's share of `rate`, in the order of `demands`: no share above
/// its demand, and what the satisfied demands leave is split equally among
/// the others. So the shares add up to the lesser of `rate` and the sum of
/// the demands (up to floating-point rounding, a few parts in 10¹⁵), a lone
/// demand gets the lesser of it and `rate`, and a demand of 0 gets 0.
///
/// Demands that are negative or not a number count as 0; so does a rate
/// that is.
pub fn fair_shares(rate: f64, demands: &[f64]) -> Vec<f64> {
    let clean = |x: f64| if x > 0.0 { x } else { 0.0 };
    let mut left = clean(rate);
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| clean(demands[a]).total_cmp(&clean(demands[b])));
    let mut shares = vec![0.0; demands.len()];
    // Smallest demand first: while a demand fits in an equal split of what
    // is left, it is served whole, which only raises the others' split.
    for (served, &i) in order.iter().enumerate() {
        let equal = left / (order.len() - served) as f64;
        let demand = clean(demands[i]);
        if demand <= equal {
            shares[i] = demand;
            left -= demand;
        } else {
            for &j in &order[served..] {
                shares[j] = equal;
            }
            break;
        }
    }
    shares
}

/// The shares the tasks may use: each claim's [`fair_shares`], plus an
/// equal part of what the claims leave of `rate` for every task that claims
/// something (an idle task, claiming 0, gets 0). The shares add up to
/// `rate` whenever a task claims anything.
///
/// Claims follow use (what a task sent, with headroom), so the unclaimed
/// part is what no task is using now: spread over the busy tasks, it lets
/// one whose use grows send more at once, before its larger claim has been
/// read by the others.
///
/// The fleet's guarantee needs the share to be monotone, as the fair split
/// is: a larger claim of its own never lowers a task's share, a larger
/// claim of another's never raises it. The task count that splits the
/// unclaimed part only grows with a claim (from 0), so it keeps that too.
pub fn shares_in_use(rate: f64, claims: &[f64]) -> Vec<f64> {
    let mut shares = fair_shares(rate, claims);
    let busy = claims.iter().filter(|&&claim| claim > 0.0).count();
    let claimed: f64 = shares.iter().sum();
    let left = if rate > 0.0 { rate - claimed } else { 0.0 };
    if busy > 0 && left > 0.0 {
        let part = left / busy as f64;
        for (share, _) in shares.iter_mut().zip(claims).filter(|(_, c)| **c > 0.0) {
            *share += part;
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::Xorshift;

    /// Relative room for rounding in the sums.
    const ROUNDING: f64 = 1e-12;

    #[test]
    fn a_lone_task_gets_the_lesser_of_the_rate_and_its_demand() {
        assert_eq!(fair_shares(2000.0, &[5000.0]), vec![2000.0]);
        assert_eq!(fair_shares(2000.0, &[600.0]), vec![600.0]);
        assert_eq!(fair_shares(2000.0, &[2000.0]), vec![2000.0]);
    }

    #[test]
    fn busy_tasks_split_the_rate_equally() {
        assert_eq!(fair_shares(2000.0, &[2000.0, 2000.0]), vec![1000.0; 2]);
        assert_eq!(fair_shares(2000.0, &[9000.0; 4]), vec![500.0; 4]);
    }

    #[test]
    fn an_idle_task_takes_nothing_and_leaves_it_to_the_others() {
        assert_eq!(fair_shares(2000.0, &[0.0, 2000.0]), vec![0.0, 2000.0]);
        assert_eq!(
            fair_shares(2000.0, &[0.0, 3000.0, 3000.0]),
            vec![0.0, 1000.0, 1000.0]
        );
    }

    #[test]
    fn a_small_demand_is_served_whole_and_the_rest_split() {
        // 300 fits in a third of 2,000; the other two split 1,700.
        assert_eq!(
            fair_shares(2000.0, &[2000.0, 300.0, 2000.0]),
            vec![850.0, 300.0, 850.0]
        );
        // Everything fits: every demand served.
        assert_eq!(
            fair_shares(2000.0, &[100.0, 200.0, 300.0]),
            vec![100.0, 200.0, 300.0]
        );
    }

    #[test]
    fn odd_inputs_count_as_nothing() {
        assert_eq!(fair_shares(1000.0, &[]), Vec::<f64>::new());
        assert_eq!(
            fair_shares(1000.0, &[f64::NAN, -5.0, 1000.0]),
            vec![0.0, 0.0, 1000.0]
        );
        assert_eq!(fair_shares(f64::NAN, &[10.0]), vec![0.0]);
        assert_eq!(fair_shares(-1.0, &[10.0]), vec![0.0]);
        assert_eq!(
            fair_shares(1000.0, &[f64::INFINITY, 100.0]),
            vec![900.0, 100.0]
        );
    }

    /// Thousands of seeded random fleets: rates from 1 to 10,000, up to 12
    /// tasks, demands among 0, small ones, the ceiling and fractions.
    #[test]
    fn every_split_keeps_the_max_min_properties() {
        let mut random = Xorshift(0x9e37_79b9_7f4a_7c15);
        for case in 0..5000 {
            let rate = (1 + random.below(10_000)) as f64;
            let tasks = random.below(13) as usize;
            let demands: Vec<f64> = (0..tasks)
                .map(|_| match random.below(4) {
                    0 => 0.0,
                    1 => random.below(500) as f64,
                    2 => 2000.0,
                    _ => random.below(1_000_000) as f64 / 97.0,
                })
                .collect();
            let shares = fair_shares(rate, &demands);
            let context = format!("case {case}: rate {rate}, demands {demands:?}, {shares:?}");
            assert_eq!(shares.len(), demands.len(), "{context}");
            let sum: f64 = shares.iter().sum();
            let wanted: f64 = demands.iter().sum();
            assert!(sum <= rate * (1.0 + ROUNDING), "over the rate: {context}");
            // Nothing is left unused while someone wants more.
            let expected = wanted.min(rate);
            assert!(
                (sum - expected).abs() <= expected * ROUNDING + 1e-9,
                "{context}"
            );
            for (share, demand) in shares.iter().zip(&demands) {
                assert!(*share >= 0.0, "{context}");
                assert!(*share <= *demand, "over its demand: {context}");
                if *demand == 0.0 {
                    assert_eq!(*share, 0.0, "{context}");
                }
            }
            // Those held under their demand all get the same, and no less
            // than any served demand: nobody could get more without taking
            // it from someone who has less.
            let held: Vec<f64> = shares
                .iter()
                .zip(&demands)
                .filter(|(share, demand)| **share < **demand)
                .map(|(share, _)| *share)
                .collect();
            if let Some(&level) = held.first() {
                for share in &held {
                    assert!((share - level).abs() <= level * ROUNDING, "{context}");
                }
                for share in &shares {
                    assert!(*share <= level * (1.0 + ROUNDING), "{context}");
                }
            }
            if tasks == 1 {
                assert_eq!(shares[0], demands[0].min(rate), "{context}");
            }
        }
    }

    #[test]
    fn the_split_does_not_depend_on_the_order_of_the_leases() {
        let demands = [2000.0, 0.0, 150.0, 700.0, 2000.0, 33.3];
        let shares = fair_shares(1800.0, &demands);
        let mut reversed = demands;
        reversed.reverse();
        let mut back = fair_shares(1800.0, &reversed);
        back.reverse();
        assert_eq!(shares, back);
    }

    #[test]
    fn the_unclaimed_rate_goes_equally_to_the_tasks_with_work() {
        // 100 and 200 claimed of 1,000: 700 left, 350 more each.
        assert_eq!(
            shares_in_use(1000.0, &[100.0, 0.0, 200.0]),
            vec![450.0, 0.0, 550.0]
        );
        // Claims over the rate: the fair split alone, nothing left.
        assert_eq!(
            shares_in_use(1000.0, &[3000.0, 50.0, 50.0]),
            vec![900.0, 50.0, 50.0]
        );
        assert_eq!(shares_in_use(1000.0, &[0.0, 0.0]), vec![0.0, 0.0]);
        assert_eq!(shares_in_use(1000.0, &[]), Vec::<f64>::new());
        assert_eq!(shares_in_use(f64::NAN, &[10.0]), vec![0.0]);
    }

    /// What the fleet's guarantee rests on: seeded random fleets, each task's
    /// claim raised in turn: its own share never falls, no other's rises,
    /// and the shares add up to the rate.
    #[test]
    fn a_larger_claim_never_lowers_its_share_nor_raises_another() {
        let mut random = Xorshift(0x51_7cc1_b727_220a);
        for case in 0..3000 {
            let rate = (1 + random.below(10_000)) as f64;
            let tasks = 1 + random.below(10) as usize;
            let claims: Vec<f64> = (0..tasks)
                .map(|_| match random.below(3) {
                    0 => 0.0,
                    1 => random.below(300) as f64,
                    _ => random.below(20_000) as f64,
                })
                .collect();
            let before = shares_in_use(rate, &claims);
            let sum: f64 = before.iter().sum();
            let context = format!("case {case}: rate {rate}, claims {claims:?}, {before:?}");
            if claims.iter().any(|&c| c > 0.0) {
                assert!((sum - rate).abs() <= rate * ROUNDING, "{context}");
            } else {
                assert_eq!(sum, 0.0, "{context}");
            }
            let raised = random.below(tasks as u64) as usize;
            let mut more = claims.clone();
            more[raised] += (1 + random.below(5000)) as f64;
            let after = shares_in_use(rate, &more);
            for (task, (old, new)) in before.iter().zip(&after).enumerate() {
                let room = rate * ROUNDING;
                if task == raised {
                    assert!(*new >= old - room, "its own fell: {context} -> {after:?}");
                } else {
                    assert!(*new <= old + room, "another's rose: {context} -> {after:?}");
                }
            }
        }
    }
}
