/// A set of page indices below a fixed bound, one bit per page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    len: usize,
}

impl PageSet {
    /// An empty set over pages `0..len`.
    pub fn new(len: usize) -> Self {
        PageSet {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Every page in `0..len`.
    pub fn full(len: usize) -> Self {
        let mut s = PageSet::new(len);
        s.insert_range(0, len);
        s
    }

    /// The bound: pages are `0..len()`.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Ignores pages at or past the bound.
    pub fn insert(&mut self, page: usize) {
        if page < self.len {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    pub fn remove(&mut self, page: usize) {
        if page < self.len {
            self.words[page / 64] &= !(1 << (page % 64));
        }
    }

    /// Inserts `start..end`, clipped to the bound.
    pub fn insert_range(&mut self, start: usize, end: usize) {
        let end = end.min(self.len);
        let mut p = start;
        while p < end {
            if p.is_multiple_of(64) && end - p >= 64 {
                self.words[p / 64] = u64::MAX;
                p += 64;
            } else {
                self.insert(p);
                p += 1;
            }
        }
    }

    pub fn contains(&self, page: usize) -> bool {
        page < self.len && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_set(len in 0usize..300, ops in proptest::collection::vec((0usize..320, 0usize..40, 0u8..3), 0..60)) {
            let mut s = PageSet::new(len);
            let mut model = std::collections::BTreeSet::new();
            for (p, n, op) in ops {
                match op {
                    0 => { s.insert(p); if p < len { model.insert(p); } }
                    1 => { s.remove(p); model.remove(&p); }
                    _ => { s.insert_range(p, p + n); model.extend((p..(p + n).min(len)).filter(|&q| q < len)); }
                }
            }
            prop_assert_eq!(s.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(s.count(), model.len());
            for p in 0..len + 5 {
                prop_assert_eq!(s.contains(p), model.contains(&p));
            }
        }
    }

    #[test]
    fn full_covers_exactly_the_bound() {
        let s = PageSet::full(130);
        assert_eq!(s.count(), 130);
        assert!(s.contains(129) && !s.contains(130));
    }
}
