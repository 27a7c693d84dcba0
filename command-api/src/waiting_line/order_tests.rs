//! The order of a line when requests join after trying first: by arrival, not by which
//! attempt ended first.

use std::time::Duration;

use prometheus::Registry;

use super::{tickets::TicketSettings, JoinAs, LineKey, WaitSettings, WaitingLine};

fn line() -> WaitingLine {
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
    WaitingLine::new(settings, &Registry::new()).unwrap_or_else(|e| panic!("{e}"))
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
    let (first, second, third) = (line.arrive(), line.arrive(), line.arrive());
    let third = line
        .join(key(), JoinAs::waiter(third))
        .unwrap_or_else(|| panic!("line full"));
    let first = line
        .join(key(), JoinAs::waiter(first))
        .unwrap_or_else(|| panic!("line full"));
    let second = line
        .join(key(), JoinAs::waiter(second))
        .unwrap_or_else(|| panic!("line full"));
    assert!(first.is_head());
    assert_eq!(line.position(&key(), second.id), Some(2));
    assert_eq!(line.position(&key(), third.id), Some(3));
}

/// A ticket taken now waits behind every request that arrived before it.
#[test]
fn a_ticket_joins_at_the_back() {
    let line = line();
    let early = line.arrive();
    let ticket = line
        .join(key(), JoinAs::ticket("tk-1"))
        .unwrap_or_else(|| panic!("line full"));
    let waiter = line
        .join(key(), JoinAs::waiter(early))
        .unwrap_or_else(|| panic!("line full"));
    assert!(waiter.is_head());
    assert_eq!(line.ticket_position("tk-1"), Some(2));
    drop(ticket);
}
