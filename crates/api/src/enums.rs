//! The API's closed vocabularies as enums, parsed once when a resource is read: an unknown
//! value is an error naming the field (never silently a default), and every consumer matches on
//! the same type.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// An enum spelled exactly as Calico's API spells it.
macro_rules! api_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            fn expected() -> String {
                [$($text),+].join(", ")
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("{s:?} is not one of {}", Self::expected())),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}

api_enum!(
    /// IPPool `ipipMode` / `vxlanMode`.
    EncapMode { Never = "Never", Always = "Always", CrossSubnet = "CrossSubnet" }
);

impl Default for EncapMode {
    fn default() -> Self {
        EncapMode::Never
    }
}

impl EncapMode {
    pub fn enabled(self) -> bool {
        self != EncapMode::Never
    }
    /// Whether traffic to a node on another subnet (`cross`) or the same one is encapsulated.
    pub fn applies(self, cross_subnet: bool) -> bool {
        self == EncapMode::Always || (self == EncapMode::CrossSubnet && cross_subnet)
    }
}

api_enum!(
    /// A policy rule's `action`.
    Action { Allow = "Allow", Deny = "Deny", Log = "Log", Pass = "Pass" }
);

api_enum!(
    /// A policy's `types`.
    PolicyType { Ingress = "Ingress", Egress = "Egress" }
);

/// A rule's or port's protocol: Calico's names (case-insensitive on input) or a number 1–255.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    Udplite,
    Number(u8),
}

impl Default for Protocol {
    /// Endpoint ports without a protocol are TCP, as in Kubernetes.
    fn default() -> Self {
        Protocol::Tcp
    }
}

const PROTOCOL_NAMES: &[(&str, Protocol, u8)] = &[
    ("TCP", Protocol::Tcp, 6),
    ("UDP", Protocol::Udp, 17),
    ("ICMP", Protocol::Icmp, 1),
    ("ICMPv6", Protocol::Icmpv6, 58),
    ("SCTP", Protocol::Sctp, 132),
    ("UDPLite", Protocol::Udplite, 136),
];

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Number(n) => n,
            named => PROTOCOL_NAMES.iter().find(|(_, p, _)| *p == named).map_or(0, |(_, _, n)| *n),
        }
    }
    /// Protocols with ports (rule `ports` need one of these).
    pub fn has_ports(self) -> bool {
        matches!(self.number(), 6 | 17 | 132 | 136)
    }
    pub fn is_icmp(self) -> bool {
        matches!(self.number(), 1 | 58)
    }
    fn parse_name(s: &str) -> Result<Protocol, String> {
        PROTOCOL_NAMES.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(s)).map(|(_, p, _)| *p).ok_or_else(|| {
            let names: Vec<&str> = PROTOCOL_NAMES.iter().map(|(n, _, _)| *n).collect();
            format!("{s:?} is not a protocol (one of {} or 1-255)", names.join(", "))
        })
    }
    fn from_number(n: i64) -> Result<Protocol, String> {
        match u8::try_from(n) {
            Ok(n) if n >= 1 => Ok(Protocol::Number(n)),
            _ => Err(format!("protocol {n} is outside 1..255")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Number(n) => write!(f, "{n}"),
            named => f.write_str(PROTOCOL_NAMES.iter().find(|(_, p, _)| p == named).map_or("?", |(n, _, _)| n)),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Number(n) => s.serialize_u8(*n),
            named => s.serialize_str(&named.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match crate::object::IntOrString::deserialize(d)? {
            crate::object::IntOrString::Int(n) => Protocol::from_number(n),
            // A number written as a string is a number.
            crate::object::IntOrString::Str(s) => match s.parse::<i64>() {
                Ok(n) => Protocol::from_number(n),
                Err(_) => Protocol::parse_name(&s),
            },
        }
        .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsed_once_unknowns_are_errors() {
        assert_eq!("CrossSubnet".parse::<EncapMode>(), Ok(EncapMode::CrossSubnet));
        assert_eq!("always".parse::<EncapMode>().unwrap_err(), "\"always\" is not one of Never, Always, CrossSubnet");
        assert!(serde_json::from_str::<Action>("\"Reject\"").is_err());
        assert_eq!(serde_json::to_string(&PolicyType::Egress).unwrap(), "\"Egress\"");
        for (text, want) in [("\"tcp\"", Protocol::Tcp), ("\"ICMPv6\"", Protocol::Icmpv6), ("47", Protocol::Number(47))]
        {
            assert_eq!(serde_json::from_str::<Protocol>(text).unwrap(), want, "{text}");
        }
        assert_eq!(serde_json::to_string(&Protocol::Udplite).unwrap(), "\"UDPLite\"");
        assert!(serde_json::from_str::<Protocol>("300").unwrap_err().to_string().contains("outside 1..255"));
        assert!(serde_json::from_str::<Protocol>("\"gre\"").unwrap_err().to_string().contains("is not a protocol"));
        assert!(Protocol::Number(6).has_ports() && Protocol::Icmp.is_icmp() && !Protocol::Icmp.has_ports());
        assert!(EncapMode::CrossSubnet.applies(true) && !EncapMode::CrossSubnet.applies(false));
    }
}
