/* Everything a test needs: include this one header (like kvm-unit-tests' libcflat.h). */
#ifndef PROBE_H
#define PROBE_H

#include "lib/boot.h"
#include "lib/console.h"
#include "lib/io.h"
#include "lib/report.h"
#include "lib/util.h"

#endif
