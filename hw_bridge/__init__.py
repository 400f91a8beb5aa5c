"""Hardware bridge: transports, device profiles and emulated devices."""
