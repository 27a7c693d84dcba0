# The waiting line (docs/waiting-line.md): `Prefer: wait` needs no new
# events; `Prefer: respond-async` tickets do, and are written only once
# write_events_waiting_line is true (docs/upgrades.md: readers first).

variable "write_events_waiting_line" {
  description = "Write the waiting line's ticket events (Prefer: respond-async). Turn on only after every API task, job task and the projector run a release that reads them."
  type        = bool
  default     = false
}

variable "wait_max_sec" {
  description = "Longest Prefer: wait granted, seconds; below the ALB's idle timeout and the API's 30 s request timeout."
  type        = number
  default     = 25

  validation {
    condition     = var.wait_max_sec >= 1 && var.wait_max_sec < 60
    error_message = "wait_max_sec must be between 1 and 59 (the ALB closes idle connections at 60 s)."
  }
}

variable "ticket_idle_sec" {
  description = "A waiting-line ticket not polled for this long drops out of the line, seconds."
  type        = number
  default     = 120
}

variable "wait_sync_on_line" {
  description = "Each API task requests a sync (an admin job) when a waiting line forms, at most once per 5 minutes."
  type        = bool
  default     = false
}

locals {
  waiting_line_env = {
    WRITE_EVENTS_WAITING_LINE = tostring(var.write_events_waiting_line)
    WAIT_MAX_SEC              = tostring(var.wait_max_sec)
    TICKET_IDLE_SEC           = tostring(var.ticket_idle_sec)
    WAIT_SYNC_ON_LINE         = tostring(var.wait_sync_on_line)
  }
}
