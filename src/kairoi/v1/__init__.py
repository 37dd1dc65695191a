"""Generated from proto/kairoi/v1/scheduler.proto by scripts/gen-protos.sh; do not edit."""
