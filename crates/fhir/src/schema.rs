//! Element definitions of the R4 resources and datatypes the hub serves (TODO(helper)).
