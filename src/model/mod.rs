//! The network: ViT backbone and DINO head configuration, the flat parameter buffer and
//! its named-tensor table, initialisation, and the forward/backward composition.
pub mod config;
pub mod params;
pub mod vit;
