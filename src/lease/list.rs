//! The leases a state shows, in blocks of ports that share their text in
//! the state file.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::LeaseView;

/// The leases of a state, kept in blocks of the ports `p` with one
/// `p >> GROUP_SHIFT`: a pick changes one block, and the state file's text is
/// kept per block (`LeaseBlock::text`), so a save writes again only the text
/// of the block that changed.
const GROUP_SHIFT: u32 = 6;

fn group_of(port: u16) -> u16 {
    port >> GROUP_SHIFT
}

/// Consecutive leases of one group of ports (never none).
pub struct LeaseBlock {
    views: Vec<LeaseView>,
    /// The block's part of the `leases` list in the state file.
    text: OnceLock<Box<str>>,
}

impl LeaseBlock {
    fn new(views: Vec<LeaseView>) -> Arc<LeaseBlock> {
        Arc::new(LeaseBlock {
            views,
            text: OnceLock::new(),
        })
    }

    fn group(&self) -> u16 {
        group_of(self.views[0].port)
    }

    /// Each lease as `,\n` and its text in the state file (`LeaseView::pretty`):
    /// the blocks' texts one after the other, less the first comma, are the
    /// list's elements as serde_json's pretty printer writes them there.
    pub fn text(&self) -> &str {
        self.text.get_or_init(|| {
            let mut text =
                String::with_capacity(self.views.iter().map(|v| v.pretty().len() + 2).sum());
            for view in &self.views {
                text.push_str(",\n");
                text.push_str(view.pretty());
            }
            text.into_boxed_str()
        })
    }
}

/// The leases a state shows, lowest port first: one list shared by the
/// state, the view a pick keeps and the copy an update compares with. A
/// change copies the list of blocks and the block it changes, never another
/// block nor a lease's strings.
#[derive(Clone)]
pub struct LeaseList {
    blocks: Arc<Vec<Arc<LeaseBlock>>>,
    len: usize,
    /// Lowest port first (a file read may not be): each group has one block.
    sorted: bool,
}

impl Default for LeaseList {
    fn default() -> LeaseList {
        LeaseList {
            blocks: Arc::default(),
            len: 0,
            sorted: true,
        }
    }
}

impl LeaseList {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &LeaseView> + Clone {
        self.blocks.iter().flat_map(|b| b.views.iter())
    }

    pub fn blocks(&self) -> &[Arc<LeaseBlock>] {
        &self.blocks
    }

    /// Adds `view`: after the leases of lower or equal ports if the list is
    /// lowest port first, else at the end.
    pub fn push(&mut self, view: LeaseView) {
        let group = group_of(view.port);
        let last_port = self
            .blocks
            .last()
            .and_then(|b| b.views.last())
            .map(|v| v.port);
        let at = if self.sorted {
            self.blocks.partition_point(|b| b.group() <= group)
        } else {
            self.blocks.len()
        };
        let blocks = Arc::make_mut(&mut self.blocks);
        match at.checked_sub(1).filter(|&i| blocks[i].group() == group) {
            Some(i) => {
                let mut views = blocks[i].views.clone();
                let at = views.partition_point(|v| !self.sorted || v.port <= view.port);
                views.insert(at, view);
                blocks[i] = LeaseBlock::new(views);
            }
            None => {
                self.sorted &= last_port.is_none_or(|p| p <= view.port) || at < blocks.len();
                blocks.insert(at, LeaseBlock::new(vec![view]));
            }
        }
        self.len += 1;
    }

    /// Puts the leases lowest port first (the order of leases of one port kept).
    pub fn sort_by_port(&mut self) {
        if !self.sorted {
            let mut views: Vec<LeaseView> = self.iter().cloned().collect();
            views.sort_by_key(|v| v.port);
            *self = LeaseList::from(views);
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&LeaseView) -> bool) {
        let Some(first) = self
            .blocks
            .iter()
            .position(|b| !b.views.iter().all(&mut keep))
        else {
            return;
        };
        let mut blocks: Vec<Arc<LeaseBlock>> = self.blocks[..first].to_vec();
        for block in &self.blocks[first..] {
            let kept: Vec<LeaseView> = block.views.iter().filter(|&v| keep(v)).cloned().collect();
            if kept.len() == block.views.len() {
                blocks.push(block.clone());
            } else if !kept.is_empty() {
                blocks.push(LeaseBlock::new(kept));
            }
        }
        self.len = blocks.iter().map(|b| b.views.len()).sum();
        self.blocks = Arc::new(blocks);
    }

    /// `retain` for the leases of `port`, the others all kept: one block is
    /// looked at in a list lowest port first.
    pub fn retain_at(&mut self, port: u16, mut keep: impl FnMut(&LeaseView) -> bool) {
        if !self.sorted {
            return self.retain(|v| v.port != port || keep(v));
        }
        let Ok(i) = self
            .blocks
            .binary_search_by_key(&group_of(port), |b| b.group())
        else {
            return;
        };
        let views = &self.blocks[i].views;
        if views.iter().all(|v| v.port != port || keep(v)) {
            return;
        }
        let kept: Vec<LeaseView> = views
            .iter()
            .filter(|&v| v.port != port || keep(v))
            .cloned()
            .collect();
        self.len -= views.len() - kept.len();
        let blocks = Arc::make_mut(&mut self.blocks);
        if kept.is_empty() {
            blocks.remove(i);
        } else {
            blocks[i] = LeaseBlock::new(kept);
        }
    }

    /// Is this the very list `other` is (not only an equal one)?
    pub fn same(&self, other: &LeaseList) -> bool {
        Arc::ptr_eq(&self.blocks, &other.blocks)
    }

    /// This list with the blocks and views `old` has for the same leases in
    /// their place: a list read from the file another process saved, or
    /// made again from the lease table, then shares the views and the text
    /// of the one it replaces (all of it, when the leases are the same).
    pub fn reusing(self, old: &LeaseList) -> LeaseList {
        if self == *old {
            return old.clone();
        }
        if !self.sorted || !old.sorted {
            return self;
        }
        let mut before = old.blocks.iter().peekable();
        let blocks = self
            .blocks
            .iter()
            .map(|block| {
                let group = block.group();
                while before.next_if(|b| b.group() < group).is_some() {}
                let Some(kept) = before.next_if(|b| b.group() == group) else {
                    return block.clone();
                };
                if kept.views == block.views {
                    return kept.clone();
                }
                let mut them = kept.views.iter().peekable();
                let views = block
                    .views
                    .iter()
                    .map(|view| {
                        while them.next_if(|v| v.port < view.port).is_some() {}
                        them.next_if(|v| *v == view).unwrap_or(view).clone()
                    })
                    .collect();
                LeaseBlock::new(views)
            })
            .collect();
        LeaseList {
            blocks: Arc::new(blocks),
            ..self
        }
    }
}

impl From<Vec<LeaseView>> for LeaseList {
    fn from(views: Vec<LeaseView>) -> LeaseList {
        let len = views.len();
        let sorted = views.is_sorted_by_key(|v| v.port);
        let mut blocks = Vec::new();
        let mut views = views.into_iter().peekable();
        while let Some(first) = views.next() {
            let group = group_of(first.port);
            let mut run = vec![first];
            while let Some(view) = views.next_if(|v| group_of(v.port) == group) {
                run.push(view);
            }
            blocks.push(LeaseBlock::new(run));
        }
        LeaseList {
            blocks: Arc::new(blocks),
            len,
            sorted,
        }
    }
}

impl PartialEq for LeaseList {
    fn eq(&self, other: &LeaseList) -> bool {
        self.same(other) || (self.len == other.len && self.iter().eq(other.iter()))
    }
}

impl std::fmt::Debug for LeaseList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for LeaseList {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for LeaseList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<LeaseView>::deserialize(deserializer).map(LeaseList::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::ViewFields;

    fn view(port: u16, owner: &str) -> LeaseView {
        LeaseView::new(ViewFields {
            port,
            pid: 1,
            owner: owner.into(),
            since: "t".into(),
        })
    }

    #[test]
    fn a_list_read_again_shares_the_views_it_replaces() {
        let old = LeaseList::from(vec![
            view(1, "a"),
            view(2, "b"),
            view(4, "d"),
            view(700, "e"),
        ]);
        let same = LeaseList::from(vec![
            view(1, "a"),
            view(2, "b"),
            view(4, "d"),
            view(700, "e"),
        ]);
        assert!(same.reusing(&old).same(&old));
        // One lease gone, one changed, one new: the others are the old views,
        // and a block with the same leases the old block.
        let read = LeaseList::from(vec![
            view(1, "a"),
            view(3, "c"),
            view(4, "x"),
            view(700, "e"),
        ]);
        let list = read.clone().reusing(&old);
        assert_eq!(list, read);
        let (l, o, r): (Vec<_>, Vec<_>, Vec<_>) = (
            list.iter().collect(),
            old.iter().collect(),
            read.iter().collect(),
        );
        assert!(l[0].same(o[0]) && l[1].same(r[1]) && l[2].same(r[2]) && l[3].same(o[3]));
        assert!(Arc::ptr_eq(&list.blocks()[1], &old.blocks()[1]));
        assert!(LeaseList::default().reusing(&old).is_empty());
    }

    #[test]
    fn a_list_keeps_port_order_and_one_block_per_group() {
        let ports = |l: &LeaseList| l.iter().map(|v| v.port).collect::<Vec<_>>();
        let mut list = LeaseList::default();
        for port in [500, 3, 70, 3, 65535, 0, 64, 63, 129] {
            list.push(view(port, "o"));
            assert!(ports(&list).is_sorted(), "{:?}", ports(&list));
        }
        assert_eq!(ports(&list), [0, 3, 3, 63, 64, 70, 129, 500, 65535]);
        assert_eq!(list.len(), 9);
        assert_eq!(list.blocks().len(), 5);
        let text: String = list.blocks().iter().map(|b| b.text()).collect();
        let each: String = list.iter().map(|v| format!(",\n{}", v.pretty())).collect();
        assert_eq!(text, each);
        let before = list.clone();
        list.retain(|v| v.port != 3 && v.port != 500);
        assert_eq!(ports(&list), [0, 63, 64, 70, 129, 65535]);
        assert_eq!((list.len(), list.blocks().len()), (6, 4));
        assert_eq!(before.len(), 9);
        assert!(Arc::ptr_eq(&list.blocks()[3], &before.blocks()[4]));
        list.retain_at(70, |v| v.owner != "o");
        list.retain_at(0, |_| true);
        list.retain_at(1000, |_| false);
        assert_eq!(ports(&list), [0, 63, 64, 129, 65535]);
        list.retain_at(65535, |_| false);
        assert_eq!((list.len(), list.blocks().len()), (4, 3));
        // Out of order (a hand-edited file): kept as read until sorted.
        let mut read = LeaseList::from(vec![view(9, "a"), view(1, "b"), view(200, "c")]);
        read.push(view(5, "d"));
        assert_eq!(ports(&read), [9, 1, 200, 5]);
        read.retain_at(200, |_| false);
        read.push(view(200, "c"));
        read.sort_by_port();
        assert_eq!(ports(&read), [1, 5, 9, 200]);
        read.push(view(6, "e"));
        assert_eq!(ports(&read), [1, 5, 6, 9, 200]);
    }
}
