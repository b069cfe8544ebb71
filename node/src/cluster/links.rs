//! Sessions to peers over ractor_cluster (filled in with cluster mode).
