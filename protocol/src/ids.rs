//! Validated identifiers: user names, room ids and node names.
//!
//! Every identifier that crosses a module or a node boundary is one of these newtypes. The
//! constructor is the only place the character set and length are checked, so a value of the
//! type is valid by construction, also when it arrives from a peer (deserialisation validates).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    /// The string is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which identifier was being parsed.
        kind: &'static str,
    },
    /// The string is longer than allowed.
    #[error("{kind} is longer than {max} characters")]
    TooLong {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// The largest allowed length.
        max: usize,
    },
    /// The string holds a character outside the allowed set.
    #[error("{kind} may only hold {allowed}")]
    BadChar {
        /// Which identifier was being parsed.
        kind: &'static str,
        /// The allowed characters, for the error message.
        allowed: &'static str,
    },
}

fn check(
    value: &str,
    kind: &'static str,
    max: usize,
    allowed: &'static str,
    extra: &[u8],
) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId::Empty { kind });
    }
    if value.len() > max {
        return Err(InvalidId::TooLong { kind, max });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
    if !ok {
        return Err(InvalidId::BadChar { kind, allowed });
    }
    Ok(())
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal, $allowed:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The longest valid value, in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates `value` and wraps it.
            pub fn new(value: &str) -> Result<Self, InvalidId> {
                check(value, $kind, $max, $allowed, $extra)?;
                Ok(Self(Arc::from(value)))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::new(&value).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier!(
    /// A user name: 1–32 characters of `A-Z a-z 0-9 _ . -`.
    UserName, "user name", 32, "A-Z a-z 0-9 _ . -", b"_.-"
);

identifier!(
    /// A room id: 1–64 characters of `A-Z a-z 0-9 _ . : -`.
    RoomId, "room", 64, "A-Z a-z 0-9 _ . : -", b"_.:-"
);

identifier!(
    /// A node name, unique in the cluster: 1–64 characters of `A-Z a-z 0-9 _ . -`.
    NodeName, "node name", 64, "A-Z a-z 0-9 _ . -", b"_.-"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_follow_the_protocol_charset() {
        assert!(UserName::new("alice").is_ok());
        assert!(UserName::new("A.b_c-9").is_ok());
        assert!(UserName::new(&"x".repeat(32)).is_ok());
        assert_eq!(
            UserName::new(""),
            Err(InvalidId::Empty { kind: "user name" })
        );
        assert!(matches!(
            UserName::new(&"x".repeat(33)),
            Err(InvalidId::TooLong { max: 32, .. })
        ));
        for bad in ["a b", "a:b", "é", "a/b", "a\0"] {
            assert!(
                matches!(UserName::new(bad), Err(InvalidId::BadChar { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn room_ids_allow_colons_and_64_characters() {
        assert!(RoomId::new("team:eng.backend-1_x").is_ok());
        assert!(RoomId::new(&"r".repeat(64)).is_ok());
        assert!(RoomId::new(&"r".repeat(65)).is_err());
        assert!(RoomId::new("a b").is_err());
    }

    #[test]
    fn deserialising_validates() {
        let ok: RoomId = serde_json::from_str("\"lobby\"").unwrap();
        assert_eq!(ok.as_str(), "lobby");
        assert!(serde_json::from_str::<RoomId>("\"no spaces\"").is_err());
    }
}
