// gohop is an extra HTTP hop written in Go, a yardstick for the api-server's hop in
// benchmarks/tunnel_http.py: what one more process in the chain costs when it is a
// plain reverse proxy (net/http/httputil.ReverseProxy, keep-alive connections
// upstream, bodies streamed both ways) and no Python at all.
//
// Usage:
//
//	gohop -listen 127.0.0.1:0 -upstream http://127.0.0.1:PORT
//
// Every request goes to the upstream at the same path and query, headers kept
// (hop-by-hop ones dropped by httputil). stdout: "HTTP LISTENING <port>" once ready.
// SIGINT/SIGTERM exit 0.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the HTTP front")
	upstream := flag.String("upstream", "", "base URL every request is forwarded to")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil || target.Host == "" {
		fmt.Fprintln(os.Stderr, "gohop: -upstream must be an absolute URL")
		os.Exit(2)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("HTTP LISTENING %d\n", listener.Addr().(*net.TCPAddr).Port)
	server := &http.Server{Handler: httputil.NewSingleHostReverseProxy(target)}
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
		<-signals
		os.Exit(0)
	}()
	if err := server.Serve(listener); err != nil {
		log.Fatal(err)
	}
}
