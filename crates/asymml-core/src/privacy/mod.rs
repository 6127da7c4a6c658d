//! Privacy measurements: how much a tensor that leaves the trusted side tells about the data it came from.
//!
//! - [`mi`]: mutual-information estimators between paired samples of two (possibly multi-dimensional)
//!   continuous variables: Kraskov–Stögbauer–Grassberger (both variants), KSG with the local non-uniformity
//!   correction of Gao, Ver Steeg and Galstyan (2015) for strongly dependent variables, the Gaussian (linear)
//!   reference −½ ln(1 − ρ²), Linfoot's informational coefficient of correlation and a seeded jitter to
//!   break ties.

pub mod mi;
