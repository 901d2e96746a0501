//! NOTIFICATION codes (RFC 4271 §4.5, RFC 4486 Cease subcodes) and decode errors, each of
//! which carries the NOTIFICATION the session sends before it closes.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

pub fn header_error(subcode: u8, data: Vec<u8>) -> Notification {
    Notification { code: 1, subcode, data }
}
pub fn open_error(subcode: u8, data: Vec<u8>) -> Notification {
    Notification { code: 2, subcode, data }
}
pub fn update_error(subcode: u8, data: Vec<u8>) -> Notification {
    Notification { code: 3, subcode, data }
}
pub fn cease(subcode: u8) -> Notification {
    Notification { code: 6, subcode, data: vec![] }
}

impl Notification {
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM_ERROR: u8 = 5;

    pub fn hold_timer_expired() -> Self {
        Notification { code: Self::HOLD_TIMER_EXPIRED, subcode: 0, data: vec![] }
    }
    pub fn fsm_error() -> Self {
        Notification { code: Self::FSM_ERROR, subcode: 0, data: vec![] }
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            1 => "Message header error",
            2 => "OPEN message error",
            3 => "UPDATE message error",
            4 => "Hold timer expired",
            5 => "Finite state machine error",
            6 => "Cease",
            7 => "ROUTE-REFRESH message error",
            _ => "Unknown error",
        };
        let sub = match (self.code, self.subcode) {
            (1, 1) => "connection not synchronized",
            (1, 2) => "bad message length",
            (1, 3) => "bad message type",
            (2, 1) => "unsupported version number",
            (2, 2) => "bad peer AS",
            (2, 3) => "bad BGP identifier",
            (2, 4) => "unsupported optional parameter",
            (2, 6) => "unacceptable hold time",
            (2, 7) => "unsupported capability",
            (3, 1) => "malformed attribute list",
            (3, 2) => "unrecognized well-known attribute",
            (3, 3) => "missing well-known attribute",
            (3, 4) => "attribute flags error",
            (3, 5) => "attribute length error",
            (3, 6) => "invalid ORIGIN attribute",
            (3, 8) => "invalid NEXT_HOP attribute",
            (3, 9) => "optional attribute error",
            (3, 10) => "invalid network field",
            (3, 11) => "malformed AS_PATH",
            (6, 1) => "maximum number of prefixes reached",
            (6, 2) => "administrative shutdown",
            (6, 3) => "peer de-configured",
            (6, 4) => "administrative reset",
            (6, 5) => "connection rejected",
            (6, 6) => "other configuration change",
            (6, 7) => "connection collision resolution",
            (6, 8) => "out of resources",
            (6, 9) => "hard reset",
            _ => "",
        };
        if sub.is_empty() { write!(f, "{code} ({}/{})", self.code, self.subcode) } else { write!(f, "{code}: {sub}") }
    }
}

/// A message that cannot be used: the session sends `notification` and closes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({notification})")]
pub struct DecodeError {
    pub notification: Notification,
    pub reason: String,
}

impl DecodeError {
    pub fn fatal(notification: Notification, reason: impl Into<String>) -> Self {
        DecodeError { notification, reason: reason.into() }
    }
}
