// The pod sandbox ("pause") process of the test cluster's containerd: it holds the pod's
// namespaces and does nothing else until it is asked to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	// As PID 1 of the sandbox it also reaps orphans; SIGCHLD is left at its default.
	<-stop
}
