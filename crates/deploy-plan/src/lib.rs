//! Fan-out deployment planning (in progress).
