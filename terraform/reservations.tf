# Workshop reservations (docs/reservations.md, ADR 0028). The write flag follows
# docs/upgrades.md: it stays off until every process (API, jobs, projector)
# runs the release that reads reservation events, then it is turned on for the
# API and the jobs together.

variable "write_events_reservations" {
  description = "WRITE_EVENTS_RESERVATIONS of the API and the jobs: write reservation and earmark events. Turn on only after every process runs the release that reads them (docs/upgrades.md)."
  type        = bool
  default     = false
}

variable "reservation_lead_time_minutes" {
  description = "RESERVATION_LEAD_TIME_MINUTES: how long before a reservation's window its sandboxes are earmarked."
  type        = number
  default     = 60

  validation {
    condition     = var.reservation_lead_time_minutes >= 0 && var.reservation_lead_time_minutes <= 10080
    error_message = "reservation_lead_time_minutes must be between 0 and 10080."
  }
}

variable "reservation_default_overflow" {
  description = "RESERVATION_DEFAULT_OVERFLOW: open-pool (a reservation's track goes on to the open pool once its earmarks are used) or reservation-only."
  type        = string
  default     = "open-pool"

  validation {
    condition     = contains(["open-pool", "reservation-only"], var.reservation_default_overflow)
    error_message = "reservation_default_overflow must be open-pool or reservation-only."
  }
}

variable "capacity_low_water_hours" {
  description = "CAPACITY_LOW_WATER_HOURS of the API: a prefix group whose open pool runs dry sooner than this at the current allocation rate logs `pool runs dry soon`."
  type        = number
  default     = 2

  validation {
    condition     = var.capacity_low_water_hours >= 1 && var.capacity_low_water_hours <= 720
    error_message = "capacity_low_water_hours must be between 1 and 720."
  }
}

locals {
  # The same reservation settings for the API (creation, cancel, gauges) and
  # the jobs (the scheduled `jobs run reservations`).
  reservations_env = {
    WRITE_EVENTS_RESERVATIONS     = tostring(var.write_events_reservations)
    RESERVATION_LEAD_TIME_MINUTES = tostring(var.reservation_lead_time_minutes)
    RESERVATION_DEFAULT_OVERFLOW  = var.reservation_default_overflow
    CAPACITY_LOW_WATER_HOURS      = tostring(var.capacity_low_water_hours)
  }
}
