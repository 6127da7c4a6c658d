//! Element-wise work over two large buffers of the same length, shared among a few scoped threads: the copies
//! of tensors into and out of frames (asymml-protocol) and pinned staging buffers (the CUDA backend). One
//! thread copies a few GB/s, well below what the memory bus and a GPU's bus move.

/// The most threads one such copy is given (a few saturate the memory bus).
pub const MAX_COPY_THREADS: usize = 8;

/// How many parts `n` elements are cut into: one per `min_per_part` (at least one), at most `threads`.
pub fn parts(n: usize, threads: usize, min_per_part: usize) -> usize {
    (n / min_per_part.max(1)).clamp(1, threads.max(1))
}

/// Calls `f` on matching parts of `dst` and `src` (contiguous, of [`parts`] equal sizes, the last shorter),
/// each part on its own scoped thread; on the calling thread alone when there is one part.
///
/// # Panics
/// If `dst` and `src` differ in length (callers check their sizes first).
pub fn zip_parts<A: Send, B: Sync>(
    dst: &mut [A],
    src: &[B],
    threads: usize,
    min_per_part: usize,
    f: impl Fn(&mut [A], &[B]) + Sync,
) {
    assert_eq!(dst.len(), src.len(), "zip_parts: lengths differ");
    let n = src.len();
    let k = parts(n, threads, min_per_part);
    if k == 1 {
        f(dst, src);
        return;
    }
    let chunk = n.div_ceil(k);
    let f = &f;
    std::thread::scope(|s| {
        for (d, v) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            s.spawn(move || f(d, v));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_is_visited_once_in_its_own_part() {
        for (n, threads, min) in [
            (0, 4, 8),
            (5, 4, 8),
            (64, 3, 8),
            (1001, 4, 100),
            (1001, 16, 1),
        ] {
            let src: Vec<u32> = (0..n as u32).collect();
            let mut dst = vec![u32::MAX; n];
            zip_parts(&mut dst, &src, threads, min, |d, s| {
                d.iter_mut().zip(s).for_each(|(a, &b)| *a = b * 2)
            });
            assert!(
                dst.iter().zip(&src).all(|(a, b)| *a == b * 2),
                "{n} {threads}"
            );
        }
        assert_eq!(parts(1000, 4, 100), 4);
        assert_eq!(parts(1000, 16, 300), 3);
        assert_eq!(parts(10, 4, 100), 1);
        assert_eq!(parts(10, 0, 0), 1);
    }
}
