"""How a run is measured: FID and KID (Inception-v3 features), CLIP score (OpenCLIP), the
reference set and its cached features, the ranks' share of the work, and the reports."""
