// go-shutdown: a Go net/http server that stops the way Go's documentation shows
// (http.Server.Shutdown with a context deadline, srv.Close when it expires), with the
// routes grace-check drives. It is one of the comparisons in docs/check.md.
//
//	go build -o go-shutdown . && ./go-shutdown --listen 127.0.0.1:8080 --shutdown-timeout 2s
//
// Exit status 0 when Shutdown returned in time, 3 when the deadline forced the rest.
// It has no WebSocket route (Go's standard library has no WebSocket server).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	timeout := flag.Duration("shutdown-timeout", 30*time.Second, "how long Shutdown may wait")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "hello")
	})
	mux.HandleFunc("/sleep/", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/sleep/"))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "slept %d ms\n", ms)
	})
	mux.HandleFunc("/stream/", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/stream/"))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		flusher, _ := w.(http.Flusher)
		for i := 0; i < n; i++ {
			if i > 0 {
				time.Sleep(100 * time.Millisecond)
			}
			fmt.Fprintf(w, "chunk %d\n", i)
			if flusher != nil {
				flusher.Flush()
			}
		}
	})

	srv := &http.Server{Handler: mux}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	go func() {
		if err := srv.Serve(ln); err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	<-stop
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Printf("shutdown: %v", err)
		srv.Close()
		os.Exit(3)
	}
}
