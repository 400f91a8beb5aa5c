"""The glucose therapy's controller evaluation: protocols of cohorts × days × seeds."""
