"""Pure encoders and decoders: CBOR bodies (`cbor`) and the MSC3079 tables (`msc3079`)."""
