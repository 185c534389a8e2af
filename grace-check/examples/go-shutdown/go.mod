module go-shutdown

go 1.19
