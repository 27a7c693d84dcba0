//! The order of a line when requests try first and join after their refusal: by arrival, not
//! by which attempt ended first.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;

use super::{tickets::TicketSettings, JoinAs, LineKey, WaitSettings, WaitingLine};

fn line() -> Arc<WaitingLine> {
    let settings = WaitSettings {
        max_wait: Duration::from_secs(25),
        max_waiters: 64,
        settle: Duration::from_millis(100),
        tickets: TicketSettings {
            write: false,
            idle: Duration::from_secs(120),
            max_wait: Duration::from_secs(1800),
        },
    };
    Arc::new(WaitingLine::new(settings, &Registry::new()).unwrap_or_else(|e| panic!("{e}")))
}

fn key() -> LineKey {
    LineKey {
        track: Some("t".into()),
        prefix: Some("lab-".into()),
    }
}

/// A request whose first attempt ended later still goes ahead of one that arrived after it.
#[test]
fn an_earlier_arrival_joins_ahead_of_a_later_one_that_joined_first() {
    let line = line();
    let (first, second, third) = (
        line.arrive(&key()),
        line.arrive(&key()),
        line.arrive(&key()),
    );
    let third = line
        .join(key(), JoinAs::waiter(&third))
        .unwrap_or_else(|| panic!("line full"));
    let first = line
        .join(key(), JoinAs::waiter(&first))
        .unwrap_or_else(|| panic!("line full"));
    let second = line
        .join(key(), JoinAs::waiter(&second))
        .unwrap_or_else(|| panic!("line full"));
    assert!(first.is_head());
    assert_eq!(line.position(&key(), second.id), Some(2));
    assert_eq!(line.position(&key(), third.id), Some(3));
}

/// While an earlier arrival still tries first, a later one at the front of the line is not its
/// head; it is once that arrival was answered without joining.
#[test]
fn a_place_waits_for_an_earlier_arrival_still_trying() {
    let line = line();
    let (early, late) = (line.arrive(&key()), line.arrive(&key()));
    let place = line
        .join(key(), JoinAs::waiter(&late))
        .unwrap_or_else(|| panic!("line full"));
    assert_eq!(line.position(&key(), place.id), Some(1));
    assert!(!place.is_head());
    drop(early);
    assert!(place.is_head());
}

/// An arrival in another line holds nobody back here.
#[test]
fn other_lines_do_not_hold_a_head_back() {
    let line = line();
    let other = LineKey {
        track: Some("u".into()),
        prefix: Some("lab-".into()),
    };
    let _elsewhere = line.arrive(&other);
    let here = line.arrive(&key());
    let place = line
        .join(key(), JoinAs::waiter(&here))
        .unwrap_or_else(|| panic!("line full"));
    assert!(place.is_head());
}

/// A ticket taken now waits behind every request that arrived before it.
#[test]
fn a_ticket_joins_at_the_back() {
    let line = line();
    let early = line.arrive(&key());
    let _ticket = line
        .join(key(), JoinAs::ticket("tk-1"))
        .unwrap_or_else(|| panic!("line full"));
    let waiter = line
        .join(key(), JoinAs::waiter(&early))
        .unwrap_or_else(|| panic!("line full"));
    assert!(waiter.is_head());
    assert_eq!(line.ticket_position("tk-1"), Some(2));
}
