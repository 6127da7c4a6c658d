//! `simd_fn!`: a function whose body runs compiled for AVX2 + FMA when the CPU has them.

/// Defines `fn name(args) [-> T]` that runs its body compiled for AVX2 + FMA when the CPU has them (the loops
/// then vectorise 8 wide), and for the baseline target otherwise.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        simd_fn! { $(#[$m])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments, clippy::unused_unit)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            // Index loops over fixed-size blocks are deliberate: they vectorise.
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::needless_range_loop, clippy::unused_unit)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                /// The body compiled with AVX2 and FMA: a safe function that only a caller that has checked
                /// the CPU for both features may call (calling it is the one unsafe operation).
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments, clippy::unused_unit)]
                fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: `avx2` is compiled for exactly the features `avx2` and `fma`, both detected on
                    // this CPU just above; its body is the safe `imp`, so nothing else is assumed.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
