# Heartbeats with orphan reclaim, and usage reports (ADR 0030, docs/heartbeats.md,
# docs/usage.md). The API records heartbeats and stamps each opted-in
# allocation with its track's policy; the scheduled `reclaim-orphans` job warns
# and reclaims. Both read the same settings.

variable "heartbeat_tracks" {
  description = "HEARTBEAT_TRACKS: tracks whose labs send heartbeats, `track=INTERVAL[/GRACE],…` in seconds (grace default 2700, at least 300 and three intervals). Empty: no track opts in."
  type        = string
  default     = ""
}

variable "write_events_heartbeats" {
  description = "WRITE_EVENTS_HEARTBEATS: write HeartbeatMissed events (the reclaim's warning; the reclaim acts only with it on). Turn on only after every process runs the release that reads them (docs/upgrades.md)."
  type        = bool
  default     = false
}

variable "write_events_usage" {
  description = "WRITE_EVENTS_USAGE: each API task appends a periodic summary of the allocation requests it refused (RefusalsSummarized), which usage reports count. Turn on only after every process runs the release that reads them (docs/upgrades.md)."
  type        = bool
  default     = false
}

locals {
  heartbeat_usage_env = {
    HEARTBEAT_TRACKS        = var.heartbeat_tracks
    WRITE_EVENTS_HEARTBEATS = tostring(var.write_events_heartbeats)
    WRITE_EVENTS_USAGE      = tostring(var.write_events_usage)
  }
}
