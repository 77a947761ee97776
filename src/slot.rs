//! A volume's number on a FUSE connection (`Slot`) and the connection-wide inode numbers it
//! makes: the one place where `slot << 32 | local` is written. Uses only `spec` (`InodeNo`).
//!
//! A node-wide connection (`vaultfs csi`) serves volume `n` as directory `<n>` of its root,
//! the file `local` of that volume as inode `n << 32 | local`. Slots are given from 1 and
//! never twice (the kernel may still know an unpublished volume's inodes); slot 0 is the
//! connection of one volume (`vaultfs mount`), whose inode numbers are its own.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::spec::InodeNo;

/// A volume's number on its FUSE connection: its directory under a node connection's root and
/// the high half of its inode numbers there. Recorded with the volume (as a bare number, in
/// the CSI state directory and the keeper's session keys) so that the same volume keeps the
/// same numbers across daemons.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Slot(pub u32);

impl Slot {
    /// A connection's only volume (`vaultfs mount`); under CSI, no slot given yet (records
    /// written before slots existed).
    pub const SINGLE: Slot = Slot(0);

    /// The connection-wide inode number of this volume's inode `local`.
    pub fn inode(self, local: InodeNo) -> u64 {
        (u64::from(self.0) << 32) | local.0
    }

    /// The volume and its own inode number that connection inode `ino` designates on a node
    /// connection (the node root itself is `(SINGLE, ROOT)`).
    pub fn of(ino: u64) -> (Slot, InodeNo) {
        (Slot((ino >> 32) as u32), InodeNo(ino & 0xffff_ffff))
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Slot {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_inode_splits_back_into_its_slot_and_local_number() {
        let ino = Slot(7).inode(InodeNo(42));
        assert_eq!(ino, 7 << 32 | 42);
        assert_eq!(Slot::of(ino), (Slot(7), InodeNo(42)));
        assert_eq!(
            Slot::SINGLE.inode(InodeNo(42)),
            42,
            "one volume's numbers are its own"
        );
        assert_eq!(Slot::of(InodeNo::ROOT.0), (Slot::SINGLE, InodeNo::ROOT));
    }

    #[test]
    fn a_slot_is_recorded_as_a_bare_number() {
        assert_eq!(serde_json::to_string(&Slot(12)).unwrap(), "12");
        assert_eq!(serde_json::from_str::<Slot>("12").unwrap(), Slot(12));
        assert_eq!(Slot(12).to_string(), "12");
        assert_eq!("12".parse::<Slot>(), Ok(Slot(12)));
        assert!("twelve".parse::<Slot>().is_err());
    }
}
